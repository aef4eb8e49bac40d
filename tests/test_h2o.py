"""H2O heavy-hitter eviction in exported MLLM graphs: parity with the eager reference (prompt positions kept by
prefill, positions cached at the end, per layer and KV head; logits; greedy tokens) on LLaVA (GQA) and LLaVA-NeXT,
the decode graph's scoring and eviction rule on hand-made state, lint, CLI and errors."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_bench_runs, assert_plan_matches_graphs, save_peaked_llava

import tokensieve
from tokensieve.cli import main
from tokensieve.errors import GraphRewriteError, MethodSpecError, RuntimeBackendError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.heavy_hitters import HeavyHitterPass
from tokensieve.methods.h2o import H2O
from tokensieve.parity.mllm import default_cases
from tokensieve.runtimes.kv_cache import kv_names
from tokensieve.runtimes.ort import OrtRunner

BUDGET, RECENT = 40, 8


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("h2o")
    save_peaked_llava(root / "ckpt")
    cli = ["export", f"hf:{root / 'ckpt'}", "--method", f"h2o(budget={BUDGET}, recent={RECENT})"]
    assert main([*cli, "--out", str(root / "llava")]) == 0
    nxt = tokensieve.export("hf:llava-next-tiny", "h2o(budget=120, recent=16)", out=root / "next")
    a2sf = tokensieve.export(
        f"hf:{root / 'ckpt'}", f"h2o(budget={BUDGET}, recent={RECENT}, forgetting_factor=0.5)", out=root / "a2sf"
    )
    return {"llava": tokensieve.load(root / "llava"), "next": nxt, "a2sf": a2sf, "root": root}


def test_parity_llava_gqa_evicting_every_step(artifacts):
    artifact = artifacts["llava"]
    assert artifact.manifest.decoder["capacity"] == BUDGET + 1  # the default: budget + 1 slots
    assert "decode_growing" not in artifact.manifest.graphs
    report = artifact.parity(count=3, new_tokens=32)
    assert report.ok, report.text()
    for case in report.cases:
        assert case.cache == "fixed" and case.kept_match and case.kept_tokens == 2 * BUDGET
        assert case.tokens_match and case.new_tokens == 32 and case.logits_error < 1e-5
        assert case.prompt_tokens > BUDGET + 1  # the prompt is compressed and every step evicts
    prompt, image = default_cases(artifact.manifest.host, 1, 0)[0]
    out = artifact.llava_runner().generate(image, prompt, 32, ignore_eos=True)
    evicted = ~np.isin(out.cache_positions, out.retained_positions)  # prompt heavy hitters evicted while decoding
    assert evicted.sum() > 8, "eviction only ever dropped positions leaving the recent window"


def test_parity_next_at_two_image_sizes(artifacts):
    report = artifacts["next"].parity(count=2, new_tokens=24)
    assert report.ok, report.text()
    assert all(c.kept_match and c.kept_tokens == 240 for c in report.cases)


def test_a2sf_decode_form_parity_and_forgetting(artifacts):
    """h2o(..., forgetting_factor=0.5): A2SF's decayed score in prefill and at every decode step. Parity with the eager
    reference on both selections; the forgetting changes what is evicted; one hand-fed step multiplies the old
    scores by the factor before adding the same attention as plain H2O's graph."""
    artifact = artifacts["a2sf"]
    assert artifact.manifest.method_text == f"h2o(budget={BUDGET}, recent={RECENT}, forgetting_factor=0.5)"
    report = artifact.parity(count=3, new_tokens=32)
    assert report.ok, report.text()
    assert all(c.kept_match and c.tokens_match and c.kept_tokens == 2 * BUDGET for c in report.cases)
    prompt, image = default_cases(artifact.manifest.host, 1, 0)[0]
    forgetting = artifact.llava_runner().generate(image, prompt, 32, ignore_eos=True)
    plain = artifacts["llava"].llava_runner().generate(image, prompt, 32, ignore_eos=True)
    assert not np.array_equal(forgetting.retained_positions, plain.retained_positions)
    d = artifact.manifest.decoder
    shape = (d["layers"], d["kv_heads"], d["capacity"])
    held = np.broadcast_to(np.arange(d["capacity"]) + 60, shape).copy()
    scores = np.random.default_rng(1).uniform(1, 9, shape).astype(np.float32)
    write = np.full(shape[:2], 12, np.int64)
    decayed = _decode_step(artifact, scores, held, write, 30, 100)["updated_h2o_scores"]
    summed = _decode_step(artifacts["llava"], scores, held, write, 30, 100)["updated_h2o_scores"]
    reset = np.where(np.arange(d["capacity"]) == 12, 0.0, scores)
    np.testing.assert_allclose(decayed - 0.5 * reset, summed - reset, atol=1e-5)


def _decode_step(artifact, scores: np.ndarray, held: np.ndarray, write: np.ndarray, visible: int, position: int):
    runner = OrtRunner(artifact.path / artifact.manifest.graphs["decode"])
    d = artifact.manifest.decoder
    rng = np.random.default_rng(0)
    shape = (1, d["kv_heads"], d["capacity"], d["head_dim"])
    feeds = {
        "input_ids": np.array([[7]], np.int64),
        "position_ids": np.array([[position]], np.int64),
        "visible_slots": np.array([visible], np.int64),
        "write_slots": write,
        "slot_positions": held,
        "h2o_scores": scores,
        **{f"cache_{name}": rng.normal(size=shape).astype(np.float32) for name in kv_names(d["layers"])},
    }
    return runner.run(feeds)


def test_scoring_and_eviction_rule_on_hand_made_state(artifacts):
    """One decode step fed by hand: the new slot's score is reset, every visible slot gains its attention (which
    sums to the query heads per KV head), and the lightest slot outside the recent window and the unused slots is
    evicted."""
    artifact = artifacts["llava"]
    d = artifact.manifest.decoder
    layers, kv, capacity, groups = d["layers"], d["kv_heads"], d["capacity"], d["heads"] // d["kv_heads"]
    visible, position = 30, 100  # slots 0..29 in use, the new token (position 100) written to slot 12
    held = np.broadcast_to(np.arange(capacity) + 60, (layers, kv, capacity)).copy()  # slot s holds 60 + s
    held[..., 29] = 95  # inside the recent window (positions > 100 - 8)
    write = np.full((layers, kv), 12, np.int64)
    scores = np.full((layers, kv, capacity), 50.0, np.float32)
    scores[..., 12] = -1000.0  # the written slot: reset, never the old score
    scores[..., 29] = -500.0  # recent
    scores[..., 35] = -500.0  # an unused slot
    scores[0, 0, 3], scores[0, 1, 20], scores[1, 0, 5], scores[1, 1, 5] = 1.0, 2.0, 3.0, 4.0
    out = _decode_step(artifact, scores, held, write, visible, position)
    reset = np.where(np.arange(capacity) == 12, 0.0, scores)
    step = out["updated_h2o_scores"] - reset
    assert (step >= -1e-6).all() and np.abs(step[..., visible:]).max() == 0
    np.testing.assert_allclose(step.sum(-1), groups, rtol=1e-5)  # each query head's probabilities sum to 1
    assert out["evict_slots"].tolist() == [[3, 20], [5, 5]]
    scores[0, 0, 3] = scores[0, 1, 20] = 50.0  # now the lightest candidate is the lowest-slot 50 + its attention
    out = _decode_step(artifact, scores, held, write, visible, position)
    candidates = np.r_[0:12, 13:29]
    expected = candidates[np.argmin(out["updated_h2o_scores"][0][:, candidates], axis=1)]
    assert out["evict_slots"][0].tolist() == expected.tolist()


def test_lint_inspect_generate_and_errors(artifacts, capsys, tmp_path):
    artifact = artifacts["llava"]
    assert all(report["ok"] for report in artifact.manifest.lint.values()), artifact.manifest.lint
    inputs = {v["name"] for v in artifact.manifest.io["decode"]["inputs"]}
    assert {"write_slots", "slot_positions", "h2o_scores", "visible_slots"} <= inputs and "cache_position" not in inputs
    assert main(["inspect", str(artifact.path)]) == 0
    assert "heavy hitters" in capsys.readouterr().out
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(image)
    cli = ["generate", str(artifact.path), "--image", str(image), "--prompt", "what is it", "--max-new-tokens", "60"]
    assert main([*cli, "--ignore-eos", "--json"]) == 0  # far past the 41-slot cache
    info = json.loads(capsys.readouterr().out)
    assert len(info["ids"]) == 60 and info["cached_prompt_positions"] == BUDGET
    assert info["cached_positions_at_end"] == BUDGET
    with pytest.raises(RuntimeBackendError, match="fixed"):
        artifact.llava_runner(cache="growing")
    with pytest.raises(MethodSpecError, match="budget"):
        tokensieve.export("hf:llava-tiny", "h2o(budget=64)", out=tmp_path / "bad", capacity=64)
    with pytest.raises(MethodSpecError, match="recent"):
        H2O(budget=8, recent=8)
    cli = ["export", "hf:llava-tiny", "--method", "h2o(forgetting_factor=1.5)", "--out", str(tmp_path / "b")]
    assert main(cli) == 2
    model = ir.load(artifact.path / "prefill.onnx")
    with pytest.raises(GraphRewriteError, match="fixed-cache decode graph"):
        run_passes(model, [HeavyHitterPass(H2O(budget=BUDGET, recent=RECENT))])
    assert not (tmp_path / "bad").exists()


def test_plan_counts_what_the_graphs_compute(artifacts):
    """`tokensieve plan`: prefill MACs, decode-step MACs and cache bytes as the exported graphs have them."""
    for key in ["llava", "next", "a2sf"]:
        assert_plan_matches_graphs(artifacts[key])


def test_bench_drives_the_method_graphs(artifacts):
    for key in ["llava"]:
        assert_bench_runs(artifacts[key])
