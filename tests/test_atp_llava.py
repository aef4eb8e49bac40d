"""ATP-LLaVA (training-free) in exported MLLM graphs: parity with the eager reference (every cut's kept positions,
logits, greedy tokens) on data-dependent counts, one cut and two, the scores against the reference's, the selection
rule, the reference against Hugging Face, the prefill segments, the decode write slots, lint, CLI and errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from helpers import assert_bench_runs, generate_json, hf_greedy_cases, save_four_layer_llava

import tokensieve
from tokensieve.cli import main
from tokensieve.converters.families import build_mllm
from tokensieve.errors import GraphRewriteError, MethodSpecError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.atp_scores import ATPScoresPass
from tokensieve.graph_passes.cut_prefill import CutPrefillPass
from tokensieve.methods.atp_llava import ATPLLaVA
from tokensieve.parity.mllm import _hf_processor, default_cases
from tokensieve.reference.atp_llava import atp_keep, atp_llava_generate, atp_scores
from tokensieve.reference.capture import capture_attention
from tokensieve.reference.decoding import attention_forward
from tokensieve.runtimes.atp_llava import cut, keep_image_tokens
from tokensieve.runtimes.kv_cache import FixedCacheDecoder
from tokensieve.runtimes.llava import expand_placeholders, image_span
from tokensieve.runtimes.prefill import prefill_feeds


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("atp_llava")
    cli = ["export", "hf:llava-tiny", "--method", "atp_llava(layers=[1])", "--out", str(root / "tiny")]
    assert main(cli) == 0
    save_four_layer_llava(root / "ckpt")
    method = "atp_llava(layers=[1, 3], offset=0.5, grid=0)"
    deep = tokensieve.export(f"hf:{root / 'ckpt'}", method, out=root / "deep", growing_cache=False)
    return {"tiny": tokensieve.load(root / "tiny"), "deep": deep, "root": root}


def test_parity_both_caches_with_a_count_that_follows_the_image(artifacts):
    report = artifacts["tiny"].parity(count=4, new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 8 and {c.cache for c in report.cases} == {"fixed", "growing"}
    kept_images = set()
    for case in report.cases:
        assert case.kept_match and case.tokens_match and case.new_tokens == 32 and case.logits_error < 1e-5
        kept_image = case.kept_tokens - (case.prompt_tokens - 64)
        assert 16 <= kept_image < 64  # the 4x4 grid of the 8x8 image tokens, and some dropped
        kept_images.add(kept_image)
    assert len(kept_images) > 1, "the kept count should depend on the input"


def test_parity_two_cuts_and_a_write_slot_per_cut(artifacts):
    """Cuts before layers 1 and 3 of 4: layers 1-2 cache the first cut's positions, layer 3 the second's, and the
    fixed decode graph writes each group at ``position - dropped`` of its own cut; no grid, offset 0.5."""
    report = artifacts["deep"].parity(count=3, new_tokens=24)
    assert report.ok, report.text()
    assert all(c.kept_match and c.tokens_match and c.kept_tokens < c.prompt_tokens for c in report.cases)
    runner = artifacts["deep"].llava_runner()
    assert {"pruned_cache_position", "pruned_cache_position_1"} <= set(runner.decode.input_names)
    image = np.random.default_rng(5).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    features, image_id = runner.image_features(image), runner.host["image_token_id"]
    ids = expand_placeholders(runner.prompt_ids("What is it?"), image_id, len(features))
    logits, present, extras = runner.prefill(runner.inputs_embeds(ids, features), image_span(ids, image_id))
    first, second = (len(c) for c in extras["cut_positions"])
    assert len(ids) > first > second  # the second cut drops some of what the first kept
    lengths = [len(ids), first, first, second]
    assert [t.shape[2] for t in present] == [n for n in lengths for _ in ("key", "value")]
    decoder = FixedCacheDecoder(runner.decode, present, runner.capacity, [len(ids) - first, len(ids) - second])
    for step in range(3):
        logits = decoder.step(int(np.argmax(logits)), len(ids) + step)
    for layer, length in enumerate(lengths):  # each layer's new keys went right after its own prompt positions
        filled = np.abs(decoder.cache(2 * layer)[0, 0]).sum(-1) > 0
        assert filled[: length + 3].all() and not filled[length + 3 :].any()


def _reference_scores(model, inputs, layer: int):
    scorer = model.model.language_model.layers[layer].self_attn
    with torch.no_grad(), capture_attention(model, [scorer]) as records:
        full = model(**inputs, output_attentions=True, output_hidden_states=True)
        record = records[scorer]
    assert torch.equal(record["probs"], full.attentions[layer])
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[:, 0]
    return full, image, atp_scores(record, image)


def test_segment_scores_equal_the_reference(artifacts):
    """prefill_0's S_self / S_cross (mean key, row-weight MatMul) against the reference's ([I, I] logits, sliced
    probabilities), on processor inputs; and cross = 0 when no prompt position follows the image."""
    built = build_mllm("llava-tiny")
    processor = _hf_processor(built.host, built.tokenizer)
    head = artifacts["tiny"].llava_runner().prefill.graphs[0]  # prefill_0: layer 0 and its scores
    for prompt, image in default_cases(built.host, 2, 3):
        inputs = processor(images=image, text=built.host["template"].format(prompt=prompt), return_tensors="pt")
        full, image_pos, (self_ref, cross_ref) = _reference_scores(built.model, inputs, 0)
        plain = attention_forward(built.model, inputs)  # the capturing attention computes what eager computes
        assert all(torch.equal(a, b) for a, b in zip(plain.attentions, full.attentions, strict=True))
        embeds = full.hidden_states[0].numpy()
        span = (int(image_pos[0]), int(image_pos[-1]) + 1)
        out = head.run(prefill_feeds(head, embeds, span))
        np.testing.assert_allclose(out["image_self_score"], self_ref.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["image_cross_score"], cross_ref.numpy(), rtol=1e-5, atol=1e-7)
        assert (cross_ref > 0).all() and self_ref.std() > 0
        ended = head.run(prefill_feeds(head, embeds[:, : span[1]], span))  # the image ends the prompt
        assert not ended["image_cross_score"].any()
        np.testing.assert_allclose(ended["image_self_score"], out["image_self_score"], rtol=1e-5, atol=1e-6)


def test_rule_on_hand_made_scores():
    rng = np.random.default_rng(0)
    methods = (ATPLLaVA(), ATPLLaVA(offset=-1.0, grid=0), ATPLLaVA(offset=1.5, grid=1), ATPLLaVA(threshold=0.1))
    for method in methods:
        for _ in range(5):  # 40 of 64 image tokens still present (after an earlier cut), at prompt positions 3..66
            present = np.sort(rng.choice(64, 40, replace=False))
            s, c = rng.standard_normal(40).astype(np.float32), rng.random(40).astype(np.float32) * 0.1
            host = keep_image_tokens(s, c, present, 64, method)
            eager = atp_keep(torch.from_numpy(s), torch.from_numpy(c), torch.from_numpy(present), 64, method)
            assert np.array_equal(host, eager.numpy())
            positions = np.setdiff1d(np.arange(80), 3 + np.setdiff1d(np.arange(64), present))
            kept, kept_image = cut(
                {"image_self_score": s, "image_cross_score": c}, positions, 3 + present, (3, 67), method
            )
            assert np.array_equal(kept_image, 3 + present[host]) and len(kept) == 16 + host.sum()
    # 4x4 image tokens, grid 0.25 -> stride 2 -> tokens 0, 2, 8, 10; S_r = (self + cross) / 2
    self_score, cross, every = np.array([0.0] * 15 + [4.0], np.float32), np.zeros(16, np.float32), np.arange(16)
    keep = keep_image_tokens(self_score, cross, every, 16, ATPLLaVA(threshold=1.0))
    assert np.flatnonzero(keep).tolist() == [0, 2, 8, 10, 15]
    # mean + 0 std: only scores above the mean (0.25); a threshold equal to a score drops it (strict >)
    assert np.flatnonzero(keep_image_tokens(self_score, cross, every, 16, ATPLLaVA(grid=0))).tolist() == [15]
    assert not keep_image_tokens(self_score, cross, every, 16, ATPLLaVA(threshold=2.0, grid=0)).any()
    # grid membership follows the token's place in the image, not its rank among the tokens present
    zeros = np.zeros(2, np.float32)
    assert keep_image_tokens(zeros, zeros, np.array([1, 8]), 16, ATPLLaVA(threshold=1.0)).tolist() == [False, True]


def test_reference_keeps_everything_and_equals_hf_generate_at_a_low_threshold():
    changed = 0
    for model, inputs, expected, logits in hf_greedy_cases("llava-tiny", 3, 1, 12):
        everything = atp_llava_generate(model, inputs, ATPLLaVA(layers=[1], threshold=-1e30), 12)
        assert len(everything.kept_positions) == inputs["input_ids"].shape[1] and everything.ids == expected
        assert torch.allclose(everything.prefill_logits, logits, atol=1e-5, rtol=0)
        pruned = atp_llava_generate(model, inputs, ATPLLaVA(layers=[1], offset=1.0, grid=0), 12)
        changed += pruned.ids != expected
    assert changed  # dropping image tokens changes what a random model says


def test_text_only_prompt_keeps_everything(artifacts):
    for artifact in (artifacts["tiny"], artifacts["deep"]):
        out = artifact.generate(None, "no picture", 4, ignore_eos=True, template="USER: {prompt} ASSISTANT:")
        assert out.image_span is None
        assert all(np.array_equal(c, np.arange(len(out.prompt_ids))) for c in out.cut_positions)


def test_graphs_lint_clean_inspect_and_generate(artifacts, capsys):
    artifact = artifacts["tiny"]
    manifest = artifact.manifest
    assert manifest.method_text == "atp_llava(layers=[1], offset=0, grid=0.25)"
    assert list(manifest.graphs)[:6] == ["vision", "embed", "prefill_0", "prefill_1", "decode", "decode_growing"]
    for entry in (*manifest.lint.values(), *artifacts["deep"].manifest.lint.values()):
        assert entry["ok"], entry
    io = manifest.io
    assert [v["name"] for v in io["prefill_0"]["inputs"]] == ["inputs_embeds", "position_ids", "image_positions"]
    assert io["prefill_0"]["outputs"][0]["name"] == "hidden_states_out"
    assert [v["name"] for v in io["prefill_1"]["inputs"]] == ["hidden_states", "position_ids"]
    middle = artifacts["deep"].manifest.io["prefill_1"]
    assert [v["name"] for v in middle["inputs"]] == ["hidden_states", "position_ids", "image_positions"]
    assert "pruned_cache_position" in [v["name"] for v in io["decode"]["inputs"]]
    for key in ("prefill_0", "prefill_1"):
        ops = {n.op_type for n in ir.load(artifact.path / f"{key}.onnx").graph}
        assert not ops & {"NonZero", "Loop", "Unique", "If"}
    directory = artifact.path
    assert main(["inspect", str(directory)]) == 0
    assert "plus a spatial grid of 16 of 64" in capsys.readouterr().out
    out = generate_json(directory, artifacts["root"] / "image.png", capsys)
    kept_image = len(out["kept_positions"]) - (out["prompt_tokens"] - 64)
    assert 16 <= kept_image < 64 and out["image_span"][1] - out["image_span"][0] == 64
    assert out["cut_counts"] == [len(out["kept_positions"])]
    assert main(["gate", str(directory)]) == 0


def test_bad_requests_are_typed_errors(tmp_path):
    with pytest.raises(MethodSpecError, match="LLaVA-NeXT packs a thumbnail and crops"):
        tokensieve.export("hf:llava-next-tiny", "atp_llava()", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match="layer 2 is out of range; this decoder has 2 layers"):
        tokensieve.export("hf:llava-tiny", "atp_llava(layers=[2])", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match="works on an MLLM decoder"):
        tokensieve.export("timm:vit_tiny_patch16_224", "atp_llava()", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match=r"grid \(fraction of image tokens kept\) must be in \[0, 1\]"):
        ATPLLaVA(grid=2)
    with pytest.raises(MethodSpecError, match="threshold must be a finite number"):
        ATPLLaVA(threshold="high")
    with pytest.raises(MethodSpecError, match="decoder layers >= 1 to cut before"):
        ATPLLaVA(layers=[0, 2])
    with pytest.raises(MethodSpecError, match="contain duplicates"):
        ATPLLaVA(layers=[2, 2])
    with pytest.raises(MethodSpecError, match="give threshold"):
        ATPLLaVA(threshold=0.1, offset=1)
    with pytest.raises(MethodSpecError, match="square grid of image tokens"):
        ATPLLaVA().grid_positions(30)
    assert not (tmp_path / "out").exists()
    assert main(["export", "hf:llava-tiny", "--method", "atp_llava(layers=[3])", "--out", str(tmp_path / "out")]) == 2


def test_passes_refuse_what_they_cannot_cut(artifacts):
    decode = ir.load(artifacts["tiny"].path / "decode.onnx")
    with pytest.raises(GraphRewriteError, match="expected a prefill graph"):
        run_passes(decode, [ATPScoresPass(0)])
    with pytest.raises(GraphRewriteError, match="expected a prefill graph"):
        run_passes(decode, [CutPrefillPass(1)])
    tail = ir.load(artifacts["tiny"].path / "prefill_1.onnx")
    with pytest.raises(GraphRewriteError, match=r"layers \[0, 1\) are not a proper segment of 1 decoder layers"):
        run_passes(tail, [CutPrefillPass(0, 1)])


def test_bench_drives_the_method_graphs(artifacts):
    for key in ["deep"]:
        assert_bench_runs(artifacts[key])
