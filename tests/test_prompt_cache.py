"""Prompt-cache compression (SnapKV, A2SF) in exported MLLM prefill graphs: parity with the eager references
(positions kept per layer and KV head, logits, greedy tokens) on both decode cache forms, the compressed cache's
contents, the scoring and selection rules on hand-made attention, lint, CLI and errors."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import onnx_ir as ir
import pytest
import torch
from helpers import assert_bench_runs, assert_plan_matches_graphs, prefill_case

import tokensieve
from tokensieve.cli import main
from tokensieve.converters.families import build_mllm
from tokensieve.errors import CapacityError, GraphRewriteError, MethodSpecError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.prompt_cache import PromptCachePass
from tokensieve.methods.a2sf import A2SF
from tokensieve.methods.snapkv import SnapKV
from tokensieve.parity.mllm import _hf_processor, default_cases
from tokensieve.reference.decoding import prefill
from tokensieve.reference.prompt_cache import compressed_generate, select

CAPACITY = 128


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapkv")
    cli = ["export", "hf:llava-tiny", "--method", "snapkv(budget=48, window=8)", "--capacity", str(CAPACITY)]
    assert main([*cli, "--out", str(root / "llava")]) == 0
    method = "snapkv(budget=64, window=8, kernel=7, pool='max')"
    nxt = tokensieve.export("hf:llava-next-tiny", method, out=root / "next", capacity=256, growing_cache=False)
    a2sf = tokensieve.export("hf:llava-tiny", "a2sf(budget=40, recent=8)", out=root / "a2sf", capacity=CAPACITY)
    h2o = "a2sf(budget=96, recent=4, forgetting_factor=1)"
    a2sf_next = tokensieve.export("hf:llava-next-tiny", h2o, out=root / "a2sf_next", capacity=256, growing_cache=False)
    return {"llava": tokensieve.load(root / "llava"), "next": nxt, "a2sf": a2sf, "a2sf_next": a2sf_next, "root": root}


def test_parity_llava_gqa_avg_pool_both_caches(artifacts):
    report = artifacts["llava"].parity(count=2, new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 4 and {c.cache for c in report.cases} == {"fixed", "growing"}
    for case in report.cases:
        assert case.kept_match and case.kept_tokens == 48
        assert case.tokens_match and case.new_tokens == 32 and case.logits_error < 1e-5
        assert case.prompt_tokens + 31 > CAPACITY  # fits only because the prompt cache was compressed


def test_parity_next_max_pool_at_four_image_sizes(artifacts):
    report = artifacts["next"].parity(count=4, new_tokens=24, caches=("fixed",))
    assert report.ok, report.text()
    assert sorted(c.image_tokens for c in report.cases) == [136, 200, 244, 336]
    assert all(c.kept_match and c.kept_tokens == 64 for c in report.cases)


def test_compressed_cache_holds_the_selected_keys_and_values(artifacts):
    """Level-2 check: the graph's present_* equal the full eager cache gathered at the graph's own positions."""
    from transformers import DynamicCache

    artifact = artifacts["llava"]
    built, inputs, ids, present, extras = prefill_case(artifact, "llava-tiny", 5)
    positions = extras["cache_positions"]  # [layers, kv_heads, 48]
    assert positions.shape == (2, 2, 48) and all(np.all(np.diff(p) > 0) for p in positions.reshape(4, 48))
    assert (positions[..., -8:] == np.arange(len(ids) - 8, len(ids))).all()  # the window is always kept
    cache = DynamicCache()
    with torch.no_grad():
        prefill(built.model, built.model(**inputs, output_hidden_states=True).hidden_states[0], cache)
    for layer, keep in enumerate(positions):
        for kind, full in (("key", cache.layers[layer].keys), ("value", cache.layers[layer].values)):
            expected = np.stack([full[0, h, keep[h]].numpy() for h in range(2)])[None]
            np.testing.assert_allclose(present[2 * layer + (kind == "value")], expected, atol=1e-5)


def test_selection_rule_on_hand_made_attention():
    """Window rows, window columns zeroed, GQA group mean, pooling, window forced in, ascending."""
    length, heads = 12, 4
    attention = torch.zeros(1, heads, length, length)
    attention[0, :, -3:, 2] = 0.5  # every head: position 2 is the prefix favourite
    attention[0, :2, -3:, 6] = 0.4  # heads 0-1 (KV group 0) also like 6
    attention[0, 2:, -3:, 4] = 0.4  # heads 2-3 (KV group 1) like 4
    attention[0, :, :-3, 7] = 9.0  # rows outside the window do not count
    attention[0, :, -3:, 10] = 5.0  # nor do the window's own columns
    exact = select(attention, 2, SnapKV(budget=5, window=3, kernel=1))
    assert exact.tolist() == [[2, 6, 9, 10, 11], [2, 4, 9, 10, 11]]
    # an averaging kernel of 3 spreads the mass: 3 (between 2 and 4) leads group 1; exact ties go to the lower index
    pooled = select(attention, 2, SnapKV(budget=5, window=3, kernel=3))
    assert pooled.tolist() == [[1, 2, 9, 10, 11], [1, 3, 9, 10, 11]]
    maxed = select(attention, 2, SnapKV(budget=7, window=3, kernel=3, pool="max"))
    assert maxed.tolist() == [[1, 2, 3, 5, 9, 10, 11], [1, 2, 3, 4, 9, 10, 11]]
    short = select(attention[:, :, :4, :4], 2, SnapKV(budget=5, window=3))
    assert short.tolist() == [[0, 1, 2, 3]] * 2  # a prompt within the budget keeps everything


def test_a2sf_parity_llava_both_caches_and_next_without_forgetting(artifacts):
    report = artifacts["a2sf"].parity(count=2, new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 4 and all(c.kept_match and c.kept_tokens == 40 for c in report.cases)
    assert all(c.tokens_match and c.new_tokens == 32 and c.logits_error < 1e-5 for c in report.cases)
    report = artifacts["a2sf_next"].parity(count=2, new_tokens=24, caches=("fixed",))
    assert report.ok, report.text()
    assert all(c.kept_match and c.kept_tokens == 96 for c in report.cases)
    assert all(entry["ok"] for entry in artifacts["a2sf"].manifest.lint.values())


def test_a2sf_rule_on_hand_made_attention():
    """Rows weighted by factor ** age, summed over rows and the KV group's heads; the recent positions forced in."""
    attention = torch.zeros(1, 2, 8, 8)
    attention[0, :, 7, 1] = 0.3  # the newest row (weight 1)
    attention[0, :, 5, 3] = 0.5  # two rows older
    attention[0, :, 2, 0] = 1.0  # five rows older
    attention[0, :, 7, 6] = 9.0  # a recent column: kept whatever its score
    forgetting = select(attention, 1, A2SF(budget=4, recent=2, forgetting_factor=Fraction(1, 2)))
    assert forgetting.tolist() == [[1, 3, 6, 7]]  # 0.3 > 0.5/4 > 1/32
    accumulating = select(attention, 1, A2SF(budget=4, recent=2, forgetting_factor=1))
    assert accumulating.tolist() == [[0, 3, 6, 7]]  # H2O's plain sum: 1.0 > 0.5 > 0.3


def test_compression_changes_the_generation():
    built = build_mllm("llava-tiny")
    model = built.model
    model.generation_config.eos_token_id = None
    processor = _hf_processor(built.host, built.tokenizer)
    changed = False
    for prompt, image in default_cases(built.host, 2, 1):
        inputs = processor(images=image, text=built.host["template"].format(prompt=prompt), return_tensors="pt")
        with torch.no_grad():
            full = model.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=0)
        snap = compressed_generate(model, inputs, SnapKV(budget=16, window=4), 16)
        changed |= snap.ids != full[0, inputs["input_ids"].shape[1] :].tolist()
    assert changed


def test_lint_inspect_generate_and_capacity(artifacts, capsys):
    artifact = artifacts["llava"]
    manifest = artifact.manifest
    assert manifest.method_text == "snapkv(budget=48, window=8, kernel=5, pool='avg')"
    assert all(entry["ok"] for entry in manifest.lint.values()), manifest.lint
    outputs = {v["name"]: v["shape"] for v in manifest.io["prefill"]["outputs"]}
    assert outputs["cache_positions"] == [2, 2, "min(sequence,48)"]
    assert outputs["present_key_0"] == [1, 2, "min(sequence,48)", 16]
    assert manifest.sites["prefill"]["sites"][1]["cache_out"] == ["present_key_1", "present_value_1"]
    ops = {n.op_type for n in ir.load(artifact.path / "prefill.onnx").graph}
    assert {"TopK", "AveragePool", "GatherElements"} <= ops and not ops & {"NonZero", "Loop", "ScatterElements"}
    directory = str(artifact.path)
    assert main(["inspect", directory]) == 0
    assert "caches at most 48 prompt positions" in capsys.readouterr().out
    image = np.random.default_rng(3).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    out = artifact.generate(image, "Count them.", 60, ignore_eos=True)  # 93 prompt tokens + 59 > 128 slots
    assert len(out.ids) == 60 and out.cache_positions.shape == (2, 2, 48)
    with pytest.raises(CapacityError, match=r"\(48 cached after snapkv\)"):
        artifact.generate(image, "Count them.", 82)
    text = artifact.generate(None, "hi", 4, ignore_eos=True, template="USER: {prompt} ASSISTANT:")
    assert text.cache_positions.shape[-1] == len(text.prompt_ids) < 48  # within the budget: nothing dropped
    capsys.readouterr()
    template = ["--template", "USER: {prompt} ASSISTANT:"]
    assert main(["generate", directory, "--prompt", "hi", *template, "--json", "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["cached_prompt_positions"] <= 48


def test_bad_snapkv_requests_are_typed_errors(artifacts, tmp_path):
    with pytest.raises(MethodSpecError, match="budget=512 leaves no cache slot"):
        tokensieve.export("hf:llava-tiny", "snapkv(budget=512)", out=tmp_path / "out")
    for text, message in (
        ("snapkv(budget=8, window=8)", "8 always-kept recent positions must be fewer than budget=8"),
        ("a2sf(budget=16, recent=16)", "16 always-kept recent positions must be fewer than budget=16"),
        ("a2sf(forgetting_factor=0)", r"forgetting_factor must be in \(0, 1\]"),
        ("a2sf(forgetting_factor=1.5)", r"forgetting_factor must be in \(0, 1\]"),
        ("snapkv(kernel=4)", "kernel must be odd"),
        ("snapkv(pool='median')", "pool must be one of"),
        ("snapkv(window=0)", "window must be a positive integer"),
        ("snapkv(budget=4000)", "TensorRT rejects"),
    ):
        with pytest.raises(MethodSpecError, match=message):
            tokensieve.export("hf:llava-tiny", text, out=tmp_path / "out", capacity=8192)
    with pytest.raises(MethodSpecError, match="works on an MLLM decoder"):
        tokensieve.export("timm:vit_tiny_patch16_224", "snapkv()", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["export", "hf:llava-tiny", "--method", "snapkv(kernel=2)", "--out", str(tmp_path / "out")]) == 2
    decode = ir.load(artifacts["next"].path / "decode.onnx")
    with pytest.raises(GraphRewriteError, match="expected a prefill graph"):
        run_passes(decode, [PromptCachePass(SnapKV(budget=64))])


def test_plan_counts_what_the_graphs_compute(artifacts):
    """`tokensieve plan`: prefill MACs, decode-step MACs and cache bytes as the exported graphs have them."""
    for key in ["llava", "next", "a2sf", "a2sf_next"]:
        assert_plan_matches_graphs(artifacts[key])


def test_bench_drives_the_method_graphs(artifacts):
    for key in ["llava", "a2sf"]:
        assert_bench_runs(artifacts[key])
