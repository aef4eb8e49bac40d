"""MustDrop in exported MLLM graphs: parity with the eager reference (windows merged, key set, every filter's kept
positions, logits, greedy tokens), the graph scores against the reference's and Hugging Face's, the host rules on
hand-made inputs, the reference against Hugging Face, the per-layer decode positions, lint, CLI and errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
import torch
from helpers import assert_bench_runs, generate_json, save_four_layer_llava

import tokensieve
from tokensieve.cli import main
from tokensieve.converters.families import build_mllm
from tokensieve.errors import GraphRewriteError, MethodSpecError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.dual_attention import DualAttentionPass
from tokensieve.graph_passes.split_positions import SplitPositionsPass
from tokensieve.methods.decoder import DecoderContext
from tokensieve.methods.mustdrop import MustDrop
from tokensieve.parity.mllm import _hf_processor, default_cases
from tokensieve.reference.decoding import attention_forward
from tokensieve.reference.mustdrop import filter_keep, mustdrop_generate, mustdrop_vision, window_similarity
from tokensieve.runtimes.image_families import preprocess
from tokensieve.runtimes.mustdrop import cut, key_tokens, merge_windows
from tokensieve.runtimes.prefill import prefill_feeds

DEEP = "mustdrop(layers=[1, 2], global_threshold=0.0105, individual_threshold=0.02, merge_threshold=0.1)"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mustdrop")
    save_four_layer_llava(root / "ckpt", image_size=126)  # a 9 x 9 patch grid: nine 3 x 3 windows
    assert main(["export", f"hf:{root / 'ckpt'}", "--method", DEEP, "--out", str(root / "deep")]) == 0
    plain = tokensieve.export(
        f"hf:{root / 'ckpt'}",
        "mustdrop(layers=[2], global_threshold=0.012, individual_threshold=0.02, merge_threshold=none)",
        out=root / "plain",
    )
    built = build_mllm(str(root / "ckpt"))
    return {"deep": tokensieve.load(root / "deep"), "plain": plain, "root": root, "built": built}


def _cases(built, count: int, seed: int):
    processor = _hf_processor(built.host, built.tokenizer)
    for prompt, image in default_cases(built.host, count, seed):
        yield processor(images=image, text=built.host["template"].format(prompt=prompt), return_tensors="pt"), image


def test_parity_with_merges_and_drops(artifacts):
    report = artifacts["deep"].parity(count=4, new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 8 and {c.cache for c in report.cases} == {"fixed", "growing"}
    for case in report.cases:
        assert case.kept_match and case.tokens_match and case.logits_error < 1e-5
    assert len({c.image_tokens for c in report.cases}) > 1  # the window merge count follows the image
    assert {c.kept_tokens < c.prompt_tokens for c in report.cases} == {True, False}  # some prompts drop, some not


def test_parity_without_the_merge(artifacts):
    report = artifacts["plain"].parity(count=3, new_tokens=24)
    assert report.ok, report.text()
    assert all(c.image_tokens == 81 for c in report.cases)
    assert any(c.kept_tokens < c.prompt_tokens for c in report.cases)


def test_vision_graphs_equal_the_reference(artifacts):
    """vision_0's window similarities, the host merge and vision_1's features and key set against the eager vision
    reference (its own loop over the windows and Hugging Face's eager CLIP attention)."""
    built, runner = artifacts["built"], artifacts["deep"].llava_runner()
    method = runner.method
    merged_counts = set()
    for inputs, image in _cases(built, 4, 3):
        features, merged, key_set = mustdrop_vision(built.model, inputs["pixel_values"], method)
        pixels, _ = preprocess(image, built.host)
        stem = runner.vision[0].run({"pixel_values": pixels})
        tower = built.model.model.vision_tower
        with torch.no_grad():
            hidden = tower.encoder.layers[0](tower.pre_layrnorm(tower.embeddings(inputs["pixel_values"])), None)
        expected = window_similarity(hidden[0, 1:], method.windows(81)).numpy()
        np.testing.assert_allclose(stem["window_similarity"], expected, atol=1e-6)
        graph_features, chosen = runner.image_tokens(image)
        assert chosen["merged_windows"].tolist() == merged.tolist()
        assert chosen["key_set"].tolist() == key_set.tolist() and len(key_set) == method.key_count(len(features))
        np.testing.assert_allclose(graph_features, features.numpy(), atol=1e-5)
        merged_counts.add(len(merged))
    assert len(merged_counts) > 1


def test_dual_attention_equals_hugging_face(artifacts):
    """prefill_0's image_global_attention / image_individual_attention (layer 1) against Hugging Face's own layer-1
    probabilities on processor inputs (no window merge: the plain artifact)."""
    built = artifacts["built"]
    first = artifacts["plain"].llava_runner().prefill.graphs[0]
    scorer = artifacts["plain"].manifest.methods[0]["layers"][0]
    for inputs, _ in _cases(built, 3, 2):
        full = attention_forward(built.model, inputs)
        image = torch.nonzero(inputs["input_ids"][0] == built.model.config.image_token_id)[:, 0]
        rows = full.attentions[scorer][0, :, int(image[-1]) + 1 :][:, :, image].mean(0)
        span = (int(image[0]), int(image[-1]) + 1)
        got = first.run(prefill_feeds(first, full.hidden_states[0].numpy(), span))
        np.testing.assert_allclose(got["image_global_attention"], rows.sum(0).numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["image_individual_attention"], rows.max(0).values.numpy(), atol=1e-7)


def test_filter_rule_on_hand_made_scores():
    method = MustDrop(layers=[1], global_threshold=0.1, individual_threshold=0.3)
    positions, image, span = np.arange(8), np.arange(2, 6), (2, 6)
    total = np.array([0.5, 0.05, 0.1, 0.05], np.float32)  # sum 0.7: the bar is 0.07 (strict <)
    peak = np.array([0.1, 0.1, 0.1, 0.3], np.float32)  # 0.3 is not below 0.3
    out = {"image_global_attention": total, "image_individual_attention": peak}
    kept, left = cut(out, positions, image, span, method, np.arange(0))
    assert left.tolist() == [2, 4, 5] and kept.tolist() == [0, 1, 2, 4, 5, 6, 7]
    kept, left = cut(out, positions, image, span, method, np.array([1]))  # the key set is never dropped
    assert left.tolist() == [2, 3, 4, 5] and kept.tolist() == list(range(8))
    probs = torch.zeros(1, 1, 8, 8)
    probs[0, 0, 6:, 2:6] = torch.tensor([[0.25, 0.02, 0.05, 0.02], [0.25, 0.03, 0.05, 0.3]])
    keep = filter_keep(probs, torch.arange(2, 6), torch.tensor([False, False, False, False]), method)
    assert keep.tolist() == [True, False, True, True]


def test_window_merge_and_key_set_on_hand_made_inputs():
    method = MustDrop(layers=[1], merge_threshold=0.5)
    hidden = np.arange(1 + 36, dtype=np.float32)[None, :, None].repeat(2, axis=2)  # a 6 x 6 grid: 4 windows
    similarity = np.array([0.2, 0.9, 0.5, 0.9], np.float32)  # windows 1 and 3 tie: lower first; 0.5 counts (>=)
    merged, windows = merge_windows(hidden, similarity, method)
    assert windows.tolist() == [1, 3, 2]
    grid = method.windows(36)
    assert grid[1] == [3, 4, 5, 9, 10, 11, 15, 16, 17]
    expected_means = [np.mean(np.array(grid[w]) + 1) for w in (1, 3, 2)]
    assert merged.shape == (1, 1 + 36 - 3 * 8, 2) and merged[0, 0, 0] == 0
    np.testing.assert_allclose(merged[0, 1:4, 0], expected_means)
    assert (merged[0, 4:, 0] - 1).tolist() == grid[0]  # the unmerged tokens, ascending
    cls = np.array([[0.1, 0.3, 0.3, 0.2, 0.05]], np.float32)
    assert key_tokens(cls, MustDrop(key_ratio=0.5)).tolist() == [1, 2, 3]  # ceil(2.5); a tie takes the lower index


def test_reference_equals_hf_generate_when_nothing_is_dropped(artifacts):
    built = artifacts["built"]
    model = built.model
    model.generation_config.eos_token_id = None
    never = MustDrop(layers=[1, 2], global_threshold=0.0, merge_threshold=None)
    for inputs, _ in _cases(built, 2, 4):
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
            expected = model.generate(**inputs, max_new_tokens=10, do_sample=False, min_new_tokens=0)
        result = mustdrop_generate(model, inputs, never, 10)
        assert all(len(c) == inputs["input_ids"].shape[1] for c in result.cut_positions)
        assert result.ids == expected[0, inputs["input_ids"].shape[1] :].tolist()
        assert torch.allclose(result.prefill_logits, logits, atol=1e-5, rtol=0)


def test_decode_rotates_later_layers_at_their_cache_length(artifacts):
    """The decode graph's layers from the first filter layer on read pruned_position_ids: feeding the absolute
    position there instead changes the logits (what the parity above holds to the official per-layer rule)."""
    runner = artifacts["deep"].llava_runner(cache="growing")
    # the thresholds are host-side: drop every image token but the key set
    runner.prefill.split = dataclasses.replace(runner.method, global_threshold=1.0, individual_threshold=1.0)
    out = runner.generate(_image(), "what is this", 3, ignore_eos=True)
    dropped = len(out.prompt_ids) - len(out.kept_positions)
    assert dropped > 0
    _, present, _ = runner.prefill(
        runner.inputs_embeds(out.prompt_ids, runner.image_features(_image())), out.image_span, out.key_set
    )
    feeds = {"input_ids": np.array([[out.ids[0]]]), "position_ids": np.array([[len(out.prompt_ids)]])}
    past = dict(zip([f"past_{k}_{i}" for i in range(4) for k in ("key", "value")], present, strict=True))
    right = runner.decode.run({**feeds, **past, "pruned_position_ids": np.array([[len(out.prompt_ids) - dropped]])})
    wrong = runner.decode.run({**feeds, **past, "pruned_position_ids": feeds["position_ids"]})
    assert np.abs(right["logits"] - wrong["logits"]).max() > 1e-3
    assert int(np.argmax(right["logits"])) == out.ids[1]


def _image() -> np.ndarray:
    return (np.random.default_rng(7).random((140, 120, 3)) * 255).astype(np.uint8)


def test_lint_inspect_generate(artifacts, capsys):
    artifact = artifacts["deep"]
    manifest = artifact.manifest
    assert manifest.method_text == (
        "mustdrop(layers=[1, 2], global_threshold=0.0105, individual_threshold=0.02, key_ratio=0.08, "
        "merge_threshold=0.1)"
    )
    graphs = [k for k in manifest.graphs if k != "external_data"]
    prefill = ["prefill_0", "prefill_1", "prefill_2"]
    assert graphs == ["vision_0", "vision_1", "embed", *prefill, "decode", "decode_growing"]
    for entry in (*manifest.lint.values(), *artifacts["plain"].manifest.lint.values()):
        assert entry["ok"], entry
    decode = {v["name"] for v in manifest.io["decode"]["inputs"]}
    assert {"pruned_cache_position", "pruned_position_ids"} <= decode and "pruned_cache_position_1" not in decode
    assert {v["name"] for v in manifest.io["vision_0"]["outputs"]} == {"hidden_states", "window_similarity"}
    assert "window_similarity" not in {v["name"] for v in artifacts["plain"].manifest.io["vision_0"]["outputs"]}
    assert main(["inspect", str(artifact.path)]) == 0
    assert "mean cosine >= 0.1 after CLIP layer 0" in capsys.readouterr().out
    from PIL import Image

    Image.fromarray(_image()).save(artifacts["root"] / "image.png")
    out = generate_json(artifact.path, artifacts["root"] / "image.png", capsys)
    assert len(out["cut_counts"]) == 2
    assert len(out["key_set"]) == MustDrop().key_count(81 - 8 * len(out["merged_windows"]))
    assert main(["gate", str(artifact.path)]) == 0  # replays the golden files the parity test recorded


def test_bad_requests_are_typed_errors(tmp_path):
    with pytest.raises(MethodSpecError, match="side divisible by 3, but there are 64 patch tokens"):
        tokensieve.export("hf:llava-tiny", "mustdrop(layers=[1])", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MethodSpecError, match="the decoder needs at least 3 layers; this one has 2"):
        tokensieve.export("hf:llava-tiny", "mustdrop(layers=[1], merge_threshold=none)", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match="filter layer 3 is out of range; this decoder has 4 layers"):
        MustDrop(layers=[1, 3], merge_threshold=None).validate(DecoderContext(4, "llava", "default", 576, 64))
    with pytest.raises(MethodSpecError, match="LLaVA-NeXT packs a thumbnail and crops"):
        tokensieve.export("hf:llava-next-tiny", "mustdrop(layers=[1])", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match=r"layers must list the decoder layers \(>= 1"):
        MustDrop(layers=[0])
    with pytest.raises(MethodSpecError, match="global_threshold must be a number >= 0"):
        MustDrop(global_threshold=-1)
    with pytest.raises(MethodSpecError, match=r"merge_threshold \(a cosine\) must be in \[-1, 1\]"):
        MustDrop(merge_threshold=2)
    assert main(["export", "hf:llava-tiny", "--method", "mustdrop(layers=[5])", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_passes_refuse_the_wrong_graph(artifacts):
    with pytest.raises(GraphRewriteError, match="mustdrop: expected a prefill graph"):
        run_passes(ir.load(artifacts["deep"].path / "decode.onnx"), [DualAttentionPass(0)])
    with pytest.raises(GraphRewriteError, match="split positions: expected a decode graph"):
        run_passes(ir.load(artifacts["deep"].path / "prefill_0.onnx"), [SplitPositionsPass(1)])


def test_bench_drives_the_method_graphs(artifacts):
    for key in ["deep"]:
        assert_bench_runs(artifacts[key])
