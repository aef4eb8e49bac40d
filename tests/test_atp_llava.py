"""ATP-LLaVA (training-free) in exported MLLM graphs: parity with the eager reference (kept positions, logits, greedy
tokens) on a data-dependent kept count, the scores against the reference's, the selection rule, the reference
against Hugging Face, the prefill cut, lint, CLI and errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from helpers import generate_json, hf_greedy_cases, save_four_layer_llava

import tokensieve
from tokensieve.cli import main
from tokensieve.converters.llava import build_llava
from tokensieve.errors import GraphRewriteError, MethodSpecError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.atp_scores import ATPScoresPass
from tokensieve.graph_passes.cut_prefill import CutPrefillPass
from tokensieve.methods.atp_llava import ATPLLaVA
from tokensieve.parity_llava import _hf_processor, default_cases
from tokensieve.reference.atp_llava import atp_llava_generate, atp_scores, atp_select, capture_attention
from tokensieve.reference.decoding import attention_forward
from tokensieve.runtimes.atp_llava import keep_image_tokens, kept_positions
from tokensieve.runtimes.llava import expand_placeholders, image_span
from tokensieve.runtimes.prefill import prefill_feeds


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("atp_llava")
    assert main(["export", "hf:llava-tiny", "--method", "atp_llava(k=1)", "--out", str(root / "tiny")]) == 0
    save_four_layer_llava(root / "ckpt")
    method = "atp_llava(k=2, offset=0.5, grid=0)"
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


def test_parity_four_layers_cut_at_layer_2(artifacts):
    """Layers 2 and 3 keep fewer positions (cache slots at position - dropped); no grid; offset 0.5."""
    report = artifacts["deep"].parity(count=3, new_tokens=24)
    assert report.ok, report.text()
    assert all(c.kept_match and c.tokens_match and c.kept_tokens < c.prompt_tokens for c in report.cases)
    runner = artifacts["deep"].llava_runner()
    image = np.random.default_rng(5).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    features, image_id = runner.image_features(image), runner.host["image_token_id"]
    ids = expand_placeholders(runner.prompt_ids("What is it?"), image_id, len(features))
    _, present, extras = runner.prefill(runner.inputs_embeds(ids, features), image_span(ids, image_id))
    assert [t.shape[2] for t in present] == [len(ids)] * 4 + [len(extras["kept_positions"])] * 4


def _reference_scores(model, inputs, layer: int):
    scorer = model.model.language_model.layers[layer].self_attn
    with torch.no_grad(), capture_attention(model, scorer) as captured:
        full = model(**inputs, output_attentions=True, output_hidden_states=True)
    image = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[:, 0]
    query, key, scaling = captured["query"], captured["key"], captured["scaling"]
    return full, image, atp_scores(query, key, scaling, full.attentions[layer], image)


def test_head_graph_scores_equal_the_reference(artifacts):
    """The graph's S_self / S_cross (mean key, row-weight MatMul) against the reference's ([I, I] logits, sliced
    probabilities), on processor inputs; and cross = 0 when no prompt position follows the image."""
    artifact = artifacts["tiny"]
    built = build_llava("llava-tiny")
    processor = _hf_processor(built.host, built.tokenizer)
    runner = artifact.llava_runner()
    head = runner.prefill.graphs[0]
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
    for method in (
        ATPLLaVA(k=1),
        ATPLLaVA(k=1, offset=-1.0, grid=0),
        ATPLLaVA(k=1, offset=1.5, grid=1),
        ATPLLaVA(k=1, threshold=0.1, grid=0.1),
    ):
        for _ in range(5):
            s, c = rng.standard_normal(64).astype(np.float32), rng.random(64).astype(np.float32) * 0.1
            host = kept_positions(s, c, (3, 67), 80, method)
            eager = atp_select(torch.from_numpy(s), torch.from_numpy(c), torch.arange(3, 67), 80, method)
            assert np.array_equal(host, eager.numpy())
    # 4x4 image tokens, grid 0.25 -> stride 2 -> tokens 0, 2, 8, 10; S_r = (self + cross) / 2
    self_score = np.array([0.0] * 15 + [4.0], np.float32)
    cross = np.zeros(16, np.float32)
    assert np.flatnonzero(keep_image_tokens(self_score, cross, ATPLLaVA(threshold=1.0))).tolist() == [0, 2, 8, 10, 15]
    # mean + 0 std: only scores above the mean (0.25); a threshold equal to a score drops it (strict >)
    assert np.flatnonzero(keep_image_tokens(self_score, cross, ATPLLaVA(grid=0))).tolist() == [15]
    assert not keep_image_tokens(self_score, cross, ATPLLaVA(threshold=2.0, grid=0)).any()
    assert kept_positions(np.zeros(0, np.float32), np.zeros(0, np.float32), None, 5, ATPLLaVA()).tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_reference_keeps_everything_and_equals_hf_generate_at_a_low_threshold():
    changed = 0
    for model, inputs, expected, logits in hf_greedy_cases("llava-tiny", 3, 1, 12):
        everything = atp_llava_generate(model, inputs, ATPLLaVA(k=1, threshold=-1e30), 12)
        assert len(everything.kept_positions) == inputs["input_ids"].shape[1] and everything.ids == expected
        assert torch.allclose(everything.prefill_logits, logits, atol=1e-5, rtol=0)
        pruned = atp_llava_generate(model, inputs, ATPLLaVA(k=1, offset=1.0, grid=0), 12)
        changed += pruned.ids != expected
    assert changed  # dropping image tokens changes what a random model says


def test_text_only_prompt_keeps_everything(artifacts):
    out = artifacts["tiny"].generate(None, "no picture", 4, ignore_eos=True, template="USER: {prompt} ASSISTANT:")
    assert out.image_span is None and np.array_equal(out.kept_positions, np.arange(len(out.prompt_ids)))


def test_graphs_lint_clean_inspect_and_generate(artifacts, capsys):
    artifact = artifacts["tiny"]
    manifest = artifact.manifest
    assert manifest["method_text"] == "atp_llava(k=1, offset=0, grid=0.25)"
    assert list(manifest["graphs"])[:6] == [
        "vision",
        "embed",
        "prefill_head",
        "prefill_tail",
        "decode",
        "decode_growing",
    ]
    assert all(entry["ok"] for entry in manifest["lint"].values()), manifest["lint"]
    io = manifest["io"]
    assert [v["name"] for v in io["prefill_head"]["inputs"]] == ["inputs_embeds", "position_ids", "image_positions"]
    assert [v["name"] for v in io["prefill_tail"]["inputs"]] == ["hidden_states", "position_ids"]
    assert "pruned_cache_position" in [v["name"] for v in io["decode"]["inputs"]]
    for key in ("prefill_head", "prefill_tail"):
        ops = {n.op_type for n in ir.load(artifact.path / f"{key}.onnx").graph}
        assert not ops & {"NonZero", "Loop", "Unique", "If"}
    directory = str(artifact.path)
    assert main(["inspect", directory]) == 0
    assert "plus a spatial grid of 16 of 64" in capsys.readouterr().out
    out = generate_json(directory, artifacts["root"] / "image.png", capsys)
    kept_image = len(out["kept_positions"]) - (out["prompt_tokens"] - 64)
    assert 16 <= kept_image < 64 and out["image_span"][1] - out["image_span"][0] == 64
    assert main(["gate", directory]) == 0


def test_bad_requests_are_typed_errors(tmp_path):
    with pytest.raises(MethodSpecError, match="LLaVA-NeXT packs a thumbnail and crops"):
        tokensieve.export("hf:llava-next-tiny", "atp_llava()", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match="k=2 is out of range; this decoder has 2 layers"):
        tokensieve.export("hf:llava-tiny", "atp_llava(k=2)", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match="works on an MLLM decoder"):
        tokensieve.export("timm:vit_tiny_patch16_224", "atp_llava()", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match=r"grid \(fraction of image tokens kept\) must be in \[0, 1\]"):
        ATPLLaVA(grid=2)
    with pytest.raises(MethodSpecError, match="threshold must be a finite number"):
        ATPLLaVA(threshold="high")
    with pytest.raises(MethodSpecError, match="k must be a decoder layer index >= 1"):
        ATPLLaVA(k=0)
    with pytest.raises(MethodSpecError, match="give threshold"):
        ATPLLaVA(threshold=0.1, offset=1)
    with pytest.raises(MethodSpecError, match="square grid of image tokens"):
        ATPLLaVA().grid_positions(30)
    assert not (tmp_path / "out").exists()
    assert main(["export", "hf:llava-tiny", "--method", "atp_llava(k=3)", "--out", str(tmp_path / "out")]) == 2


def test_passes_refuse_what_they_cannot_cut(artifacts):
    decode = ir.load(artifacts["tiny"].path / "decode.onnx")
    with pytest.raises(GraphRewriteError, match="expected a prefill graph"):
        run_passes(decode, [ATPScoresPass(0)])
    with pytest.raises(GraphRewriteError, match="expected a prefill graph"):
        run_passes(decode, [CutPrefillPass(1, "tail")])
    head = ir.load(artifacts["tiny"].path / "prefill_tail.onnx")
    with pytest.raises(GraphRewriteError, match="layer 1 is out of range for 1 decoder layers"):
        run_passes(head, [CutPrefillPass(1, "head")])
