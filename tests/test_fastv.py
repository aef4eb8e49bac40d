"""FastV in exported MLLM graphs: parity with the eager reference (kept positions, logits, greedy tokens), the
reference itself against Hugging Face, both decode cache forms, lint, and errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from helpers import assert_bench_runs, assert_plan_matches_graphs, generate_json, hf_greedy_cases, save_four_layer_llava

import tokensieve
from tokensieve.cli import main
from tokensieve.errors import GraphRewriteError, MethodSpecError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.fastv import FastVPass
from tokensieve.methods.fastv import FastV
from tokensieve.reference.fastv import fastv_generate
from tokensieve.runtimes.kv_cache import FixedCacheDecoder
from tokensieve.runtimes.llava import expand_placeholders, image_span


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fastv")
    save_four_layer_llava(root / "ckpt")
    cli = ["export", f"hf:{root / 'ckpt'}", "--method", "fastv(k=2, keep=0.5)", "--capacity", "256"]
    assert main([*cli, "--out", str(root / "llava")]) == 0
    nxt = tokensieve.export("hf:llava-next-tiny", "fastv(k=1, keep=0.3)", out=root / "next", growing_cache=False)
    return {"llava": tokensieve.load(root / "llava"), "next": nxt, "root": root}


def test_parity_llava_k2_both_caches(artifacts):
    report = artifacts["llava"].parity(count=3, new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 6 and {c.cache for c in report.cases} == {"fixed", "growing"}
    for case in report.cases:
        assert case.kept_match and case.kept_tokens == case.prompt_tokens - 64 + 32  # 32 of 64 image tokens
        assert case.tokens_match and case.new_tokens == 32 and case.logits_error < 1e-5
    assert len({tuple(c.ids) for c in report.cases}) > 1


def test_parity_llava_next_image_sizes(artifacts):
    """NeXT: the image token count follows the image size; the kept count ceil(0.3 * N) follows it in the graph."""
    report = artifacts["next"].parity(count=4, new_tokens=32)
    assert report.ok, report.text()
    counts = {(c.image_tokens, c.prompt_tokens - c.kept_tokens) for c in report.cases}
    assert counts == {(n, n - -(-3 * n // 10)) for n in (136, 200, 244, 336)}
    assert all(c.kept_match and c.tokens_match for c in report.cases)


def test_reference_equals_hf_generate_at_keep_1_and_drops_at_keep_half():
    changed = 0
    for model, inputs, expected, logits in hf_greedy_cases("llava-next-tiny", 2, 0, 12):
        full = fastv_generate(model, inputs, FastV(k=1, keep=1), 12)
        assert len(full.kept_positions) == inputs["input_ids"].shape[1] and full.ids == expected
        assert torch.allclose(full.prefill_logits, logits, atol=1e-5, rtol=0)
        half = fastv_generate(model, inputs, FastV(k=1, keep=0.5), 12)
        changed += half.ids != expected
    assert changed  # dropping half the image changes what a random model says


def test_decode_writes_the_later_layers_at_the_pruned_slot(artifacts):
    artifact = artifacts["llava"]
    runner = artifact.llava_runner()
    image = np.random.default_rng(2).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    features, image_id = runner.image_features(image), runner.host["image_token_id"]
    ids = expand_placeholders(runner.prompt_ids("Where is it?"), image_id, len(features))
    logits, present, extras = runner.prefill(runner.inputs_embeds(ids, features), image_span(ids, image_id))
    kept = extras["kept_positions"]
    assert [t.shape[2] for t in present] == [len(ids)] * 4 + [len(kept)] * 4
    decoder = FixedCacheDecoder(runner.decode, present, 256, dropped=[len(ids) - len(kept)])
    for step in range(3):
        decoder.step(int(np.argmax(logits)), len(ids) + step)
    for index, length in ((0, len(ids)), (4, len(kept))):  # key_0 (layer 0), key_2 (layer 2 >= k)
        filled = np.abs(decoder.cache(index)[0, 0]).sum(-1) > 0
        assert filled[: length + 3].all() and not filled[length + 3 :].any()


def test_text_only_prompt_keeps_everything(artifacts):
    out = artifacts["llava"].generate(None, "no picture", 4, ignore_eos=True, template="USER: {prompt} ASSISTANT:")
    assert out.image_span is None and np.array_equal(out.kept_positions, np.arange(len(out.prompt_ids)))


def test_graphs_lint_clean_and_inspect(artifacts, capsys):
    manifest = artifacts["llava"].manifest
    assert manifest.method_text == "fastv(k=2, keep=0.5)"
    assert all(entry["ok"] for entry in manifest.lint.values()), manifest.lint
    io = manifest.io
    assert "image_positions" in [v["name"] for v in io["prefill"]["inputs"]]
    assert "pruned_cache_position" in [v["name"] for v in io["decode"]["inputs"]]
    prefill = ir.load(artifacts["llava"].path / "prefill.onnx")
    ops = {n.op_type for n in prefill.graph}
    assert "TopK" in ops and not ops & {"NonZero", "Loop", "Unique"}
    directory = str(artifacts["llava"].path)
    assert main(["inspect", directory]) == 0
    assert "keep 32 of 64 image tokens" in capsys.readouterr().out
    out = generate_json(directory, artifacts["root"] / "image.png", capsys)
    assert len(out["kept_positions"]) == out["prompt_tokens"] - 32 and out["image_span"][1] - out["image_span"][0] == 64


def test_bad_fastv_requests_are_typed_errors(tmp_path):
    with pytest.raises(MethodSpecError, match="k=2 is out of range; this decoder has 2 layers"):
        tokensieve.export("hf:llava-tiny", "fastv(k=2)", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match="keep must be in"):
        tokensieve.export("hf:llava-tiny", "fastv(keep=0)", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match="k must be a decoder layer index >= 1"):
        FastV(k=0)
    with pytest.raises(MethodSpecError, match="works on an MLLM decoder"):
        tokensieve.export("timm:vit_tiny_patch16_224", "fastv()", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["export", "hf:llava-tiny", "--method", "fastv(k=5)", "--out", str(tmp_path / "out")]) == 2


def test_pass_refuses_decode_graphs(artifacts):
    decode = ir.load(artifacts["next"].path / "decode.onnx")
    with pytest.raises(GraphRewriteError, match="expected a prefill graph"):
        run_passes(decode, [FastVPass(FastV(k=1))])


def _side_input_graph(read_values: bool) -> tuple[ir.Model, dict[str, ir.Value]]:
    """x -> Relu -> cut -> Mul(side) -> y, where side = Shape(x) (or x itself) computed outside the region."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["cut"]),
        helper.make_node("Shape", ["x"], ["shape"]) if not read_values else helper.make_node("Neg", ["x"], ["side"]),
        *([helper.make_node("Cast", ["shape"], ["side"], to=TensorProto.FLOAT)] if not read_values else []),
        helper.make_node("Add", ["cut", "side"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = ir.from_proto(helper.make_model(graph))
    values = {v.name: v for node in model.graph for v in (*node.inputs, *node.outputs)}
    return model, {**values, "x2": model.graph.inputs[1]}


def test_rederive_clones_shape_reads_and_refuses_value_reads():
    from tokensieve.graph_passes.rederive import downstream, rederive

    model, v = _side_input_graph(read_values=False)
    region = downstream(v["cut"])
    created = rederive(model.graph, region, {v["x"]: v["x2"]}, [v["cut"]], "after", frozenset([v["x"]]))
    assert [n.op_type for n in created] == ["Shape", "Cast"] and created[0].inputs[0] is v["x2"]
    add = next(n for n in region if n.op_type == "Add")
    assert add.inputs[1] is created[1].outputs[0] and v["side"].producer() in model.graph  # original kept
    model, v = _side_input_graph(read_values=True)
    with pytest.raises(GraphRewriteError, match="reads the values of 'x'"):
        rederive(model.graph, downstream(v["cut"]), {v["x"]: v["x2"]}, [v["cut"]], "after", frozenset([v["x"]]))


def test_plan_counts_what_the_graphs_compute(artifacts):
    """`tokensieve plan`: prefill MACs, decode-step MACs and cache bytes as the exported graphs have them."""
    for key in ["llava", "next"]:
        assert_plan_matches_graphs(artifacts[key])


def test_bench_drives_the_method_graphs(artifacts):
    for key in ["llava", "next"]:
        assert_bench_runs(artifacts[key])
