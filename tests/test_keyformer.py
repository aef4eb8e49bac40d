"""Keyformer in exported MLLM graphs: parity with the eager reference (prompt positions kept by prefill and the
positions cached after every decode step, per layer and KV head; logits; 32 greedy tokens) on LLaVA (the prompt-share
budget, the official defaults) and LLaVA-NeXT (explicit counts); the decode graph's Gumbel-softmax step on hand-made
noise; the official count expressions; no random operator; lint, plan, bench, inspect and errors."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_bench_runs, assert_plan_matches_graphs, save_peaked_llava

import tokensieve
from tokensieve.cli import main
from tokensieve.errors import CapacityError, MethodSpecError
from tokensieve.methods.decoder import DecoderContext
from tokensieve.methods.keyformer import Keyformer
from tokensieve.parity.mllm import default_cases
from tokensieve.plan.mllm import plan_mllm
from tokensieve.runtimes.kv_cache import kv_names
from tokensieve.runtimes.ort import OrtRunner

PLAN_TEXT = 103  # llava-tiny: 64 image + 103 text tokens -> int(0.6 * 167) = 100 kept, 101 slots: the capacity


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyformer")
    save_peaked_llava(root / "ckpt")  # heavy hitters that compete with new tokens: decode-time noise matters
    cli = ["export", f"hf:{root / 'ckpt'}", "--method", "keyformer()", "--capacity", "101", "--out", str(root / "a")]
    assert main(cli) == 0
    llava = tokensieve.load(root / "a")
    nxt = tokensieve.export("hf:llava-next-tiny", "keyformer(budget=120, recent=16, seed=5)", out=root / "next")
    return {"llava": llava, "next": nxt}


def test_parity_llava_prompt_share_every_step(artifacts):
    artifact = artifacts["llava"]
    assert artifact.manifest.method_text == "keyformer(kv_cache=60, recent_percent=30, tau_init=1, tau_end=2, seed=0)"
    report = artifact.parity(count=1, new_tokens=32)
    assert report.ok, report.text()
    for case in report.cases:
        kept, recent = Keyformer().counts(case.prompt_tokens)
        assert (kept, recent) == (int(case.prompt_tokens * 60.0 / 100), int(kept * 30.0 / 100))
        assert case.kept_match and case.kept_tokens == 2 * kept + 31  # prefill's, the end's, each step's eviction
        assert case.tokens_match and case.new_tokens == 32 and case.logits_error < 1e-5
    prompt, image = default_cases(artifact.manifest.host, 1, 0)[0]
    out = artifact.llava_runner().generate(image, prompt, 32, ignore_eos=True)
    length = out.prompt_ids.size
    assert out.evicted_positions.shape[-1] == 31 and (out.evicted_positions >= 0).all()  # every step evicts
    leaving = length + np.arange(31) - Keyformer().counts(length)[1]  # the position leaving the recent window
    assert (out.evicted_positions != leaving).sum() > 8, "eviction only ever dropped the position leaving the window"


def test_parity_next_explicit_counts(artifacts):
    artifact = artifacts["next"]
    assert artifact.manifest.decoder["capacity"] == 121  # budget + 1 (the same decode export as H2O's test)
    report = artifact.parity(count=1, new_tokens=32)
    assert report.ok, report.text()
    assert all(c.kept_match and c.tokens_match and c.kept_tokens == 2 * 120 + 31 for c in report.cases)
    assert all(c.prompt_tokens > 121 for c in report.cases)  # compressed prompt, evicting every step


def _step(artifact, noise: np.ndarray, tau: float) -> dict[str, np.ndarray]:
    """One decode step on hand-made state: slots 0..29 hold positions 60..89, the new token (100) goes to slot 12."""
    d = artifact.manifest.decoder
    layers, kv, capacity = d["layers"], d["kv_heads"], d["capacity"]
    rng = np.random.default_rng(0)
    shape = (1, kv, capacity, d["head_dim"])
    feeds = {
        "input_ids": np.array([[7]], np.int64),
        "position_ids": np.array([[100]], np.int64),
        "visible_slots": np.array([30], np.int64),
        "write_slots": np.full((layers, kv), 12, np.int64),
        "slot_positions": np.broadcast_to(np.arange(capacity) + 60, (layers, kv, capacity)).copy(),
        "h2o_scores": np.zeros((layers, kv, capacity), np.float32),
        "recent_window": np.array([5], np.int64),
        "gumbel_noise": noise,
        "gumbel_tau": np.array([tau], np.float32),
        **{f"cache_{name}": rng.normal(size=shape).astype(np.float32) for name in kv_names(layers)},
    }
    return OrtRunner(artifact.path / artifact.manifest.graphs["decode"]).run(feeds)


def test_gumbel_step_follows_the_fed_noise_and_temperature(artifacts):
    """The step score is the Gumbel-softmax of the logits: noise of +60 on one slot takes (nearly) all of each query
    head's mass; a huge temperature spreads it evenly over the visible slots; the lightest old slot is evicted."""
    artifact = artifacts["llava"]
    d = artifact.manifest.decoder
    groups, capacity = d["heads"] // d["kv_heads"], d["capacity"]
    noise = np.zeros((d["layers"], d["heads"], 1, capacity), np.float32)
    noise[..., 3] = 60.0
    out = _step(artifact, noise, 1.0)
    np.testing.assert_allclose(out["updated_h2o_scores"][..., 3], groups, rtol=1e-5)
    assert np.abs(out["updated_h2o_scores"][..., 30:]).max() == 0  # slots not visible
    flat = _step(artifact, np.zeros_like(noise), 1e9)["updated_h2o_scores"]
    np.testing.assert_allclose(flat[..., :30], groups / 30, rtol=1e-4)
    candidates = np.r_[0:12, 13:30]  # older than the last 5 positions (100 - 5), the written slot excluded
    lightest = candidates[np.argmin(out["updated_h2o_scores"][..., candidates], axis=-1)]
    assert (out["evict_slots"] == lightest).all()


def test_graphs_lint_clean_without_random_ops(artifacts):
    for artifact in artifacts.values():
        assert all(report["ok"] for report in artifact.manifest.lint.values()), artifact.manifest.lint
        for key in ("prefill", "decode"):
            ops = {node.op_type for node in ir.load(artifact.graph_path(key)).graph.all_nodes()}
            assert not ops & {"RandomUniformLike", "RandomNormalLike", "RandomUniform", "RandomNormal", "NonZero"}
    inputs = {v["name"] for v in artifacts["llava"].manifest.io["decode"]["inputs"]}
    assert {"gumbel_noise", "gumbel_tau", "recent_window", "h2o_scores"} <= inputs
    assert "recent_window" not in {v["name"] for v in artifacts["next"].manifest.io["decode"]["inputs"]}


def test_official_count_expressions():
    """``int(T * kv_cache / 100)`` and ``int(kept * recent / 100)`` (float percentages in the official code) equal the
    exact integer arithmetic the graphs and the host use, over every integer percentage and prompt length."""
    for percent in range(1, 100, 7):
        method = Keyformer(kv_cache=percent, recent_percent=100 - percent)
        for length in range(1, 4000, 3):
            kept = int(length * float(percent) / 100)
            assert method.counts(length) == (kept, int(kept * float(100 - percent) / 100))


def test_plan_bench_inspect(artifacts, capsys):
    assert_plan_matches_graphs(artifacts["llava"], text_tokens=PLAN_TEXT)
    assert_plan_matches_graphs(artifacts["next"])
    prompt, rows = plan_mllm("hf:llava-1.5-7b-shapes", ["keyformer()"])
    assert prompt.image_tokens + prompt.text_tokens == 636
    assert rows[1].slots == int(636 * 0.6) + 1 and rows[1].unbounded and rows[1].cache_mib < rows[0].cache_mib
    assert rows[1].decode_macs < rows[0].decode_macs
    assert_bench_runs(artifacts["llava"])
    assert main(["inspect", str(artifacts["llava"].path)]) == 0
    assert "Gumbel-softmax" in capsys.readouterr().out


def test_errors(artifacts, tmp_path):
    runner = artifacts["llava"].llava_runner()
    with pytest.raises(CapacityError, match="--capacity 103"):  # int(0.6 * 171) = 102 kept, 103 slots > 101
        runner.generate(input_ids=np.full(171, 5), max_new_tokens=2)
    with pytest.raises(MethodSpecError, match="both budget and recent"):
        Keyformer(budget=40)
    with pytest.raises(MethodSpecError, match="percentage"):
        Keyformer(kv_cache=100)
    with pytest.raises(MethodSpecError, match="positive"):
        Keyformer(tau_init=0)
    with pytest.raises(MethodSpecError, match="forgetting_factor"):
        Keyformer(forgetting_factor=Fraction(1, 2))
    with pytest.raises(MethodSpecError, match="TopK"):
        Keyformer().validate(DecoderContext(4, "llava", "default", 64, 8000))
    with pytest.raises(MethodSpecError, match="budget"):
        tokensieve.export("hf:llava-tiny", "keyformer(budget=64, recent=8)", out=tmp_path / "bad", capacity=64)
    assert main(["export", "hf:llava-tiny", "--method", "keyformer(seed=-1)", "--out", str(tmp_path / "b")]) == 2
    assert not (tmp_path / "bad").exists()
