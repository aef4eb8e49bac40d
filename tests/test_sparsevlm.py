"""SparseVLM in exported MLLM graphs: parity with the eager reference (every cut's rows, recycled cluster tokens
included, logits, 32 greedy tokens) on LLaVA with three cuts and on LLaVA-NeXT, both decode caches, the counts
against the official float expressions, the DPC-kNN reference on hand-made clusters, text-only prompts, lint and
graph ops, plan (graphs and LLaVA-1.5-7B geometry), bench, and typed errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from helpers import assert_bench_runs, save_four_layer_llava

import tokensieve
from tokensieve.cli import main
from tokensieve.errors import MethodSpecError
from tokensieve.methods.decoder import PlanInput
from tokensieve.methods.sparsevlm import SparseVLM
from tokensieve.reference.sparsevlm import dpc_knn

DEEP = "sparsevlm(layers=[0, 1, 2], budgets=[40, 24, 12])"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsevlm")
    save_four_layer_llava(root / "ckpt")
    assert (
        main(["export", f"hf:{root / 'ckpt'}", "--method", DEEP, "--capacity", "256", "--out", str(root / "deep")]) == 0
    )
    method = "sparsevlm(layers=[0], budgets=[30], seed=3)"
    nxt = tokensieve.export("hf:llava-next-tiny", method, out=root / "next", growing_cache=False)
    return {"deep": tokensieve.load(root / "deep"), "next": nxt, "root": root}


def _after(method: SparseVLM, length: int, image: int) -> list[int]:
    return method.lengths(length, image)[1:]


def test_parity_three_cuts_with_recycling_both_caches(artifacts):
    artifact = artifacts["deep"]
    report = artifact.parity(count=2, new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 4 and {c.cache for c in report.cases} == {"fixed", "growing"}
    method = artifact.llava_runner().method
    assert [(s.kept, s.recycled, s.clusters) for s in method.stages(64)] == [(40, 8, 1), (24, 6, 1), (12, 4, 1)]
    for case in report.cases:
        assert case.kept_match and case.tokens_match and case.new_tokens == 32 and case.logits_error < 1e-5
        assert case.kept_tokens == _after(method, case.prompt_tokens, 64)[-1]


def test_parity_llava_next_image_sizes(artifacts):
    """NeXT: the image token count follows the image size; kept, recycled and cluster counts follow it in the graph."""
    artifact = artifacts["next"]
    report = artifact.parity(count=3, new_tokens=8)
    assert report.ok, report.text()
    method = artifact.llava_runner().method
    assert len({c.image_tokens for c in report.cases}) == 3
    for case in report.cases:
        assert case.kept_match and case.tokens_match
        assert case.kept_tokens == _after(method, case.prompt_tokens, case.image_tokens)[-1]


def test_version_2_prefill_graph_equals_the_reference(artifacts, tmp_path):
    """Version 2 (no recycling, original position ids) on the prefill graph alone, three cuts, random embeddings:
    every cut's rows identical, logits within 1e-5."""
    from transformers import DynamicCache

    from tokensieve.converters.export import export_graph
    from tokensieve.converters.families import build_mllm
    from tokensieve.converters.llava import Prefill
    from tokensieve.graph_passes import run_passes
    from tokensieve.graph_passes.sparsevlm import SparseVLMPass
    from tokensieve.reference.sparsevlm import sparse_prefill
    from tokensieve.runtimes.ort import OrtRunner

    model = build_mllm(str(artifacts["root"] / "ckpt")).model
    hidden, names = (
        model.config.text_config.hidden_size,
        [f"present_{k}_{i}" for i in range(4) for k in ("key", "value")],
    )
    axes = {"inputs_embeds": {1: "sequence"}, "position_ids": {1: "sequence"}}
    args = (torch.randn(1, 8, hidden), torch.arange(8)[None])
    graph = export_graph(Prefill(model), args, ["inputs_embeds", "position_ids"], ["logits", *names], dynamic_axes=axes)
    method = SparseVLM(layers=[0, 1, 2], budgets=[40, 24, 12], version=2)
    run_passes(graph, [SparseVLMPass(method)])
    ir.save(graph, tmp_path / "prefill.onnx")
    embeds, image = torch.randn(1, 90, hidden, generator=torch.Generator().manual_seed(0)), torch.arange(5, 69)
    feeds = {"inputs_embeds": embeds.numpy(), "position_ids": np.arange(90)[None], "image_positions": image.numpy()}
    out = OrtRunner(tmp_path / "prefill.onnx").run(feeds)
    logits, cuts = sparse_prefill(model, embeds, image, method, DynamicCache())
    assert [len(c) for c in cuts] == [66, 50, 38]
    assert all(np.array_equal(out[f"cut_positions_{g}"], rows.numpy()) for g, rows in enumerate(cuts))
    assert np.abs(out["logits"][0] - logits.numpy()).max() < 1e-5


def test_cut_rows_carry_the_cluster_tokens(artifacts):
    """Each cut's rows: the text and kept image positions ascending, the cluster tokens (numbered from T) right after
    the kept image tokens, later cuts keeping or dropping earlier cluster tokens like image tokens."""
    out = artifacts["deep"].generate(np.full((112, 112, 3), 90, np.uint8), "What is it?", 2, ignore_eos=True)
    length, (start, end) = len(out.prompt_ids), out.image_span
    for rows in out.cut_positions:
        text = rows[(rows < start) | ((rows >= end) & (rows < length))]
        assert np.array_equal(text, np.r_[0:start, end:length])
        image = rows[start : len(rows) - (length - end)]
        kept, made = image[image < end], image[image >= length]
        assert np.all(np.diff(kept) > 0) and kept.min() >= start and np.all(np.diff(made) > 0)
        assert np.array_equal(image, np.r_[kept, made])
    assert out.cut_positions[0][start + 40] == length  # the first cut's one cluster token follows its 40 image tokens


def test_text_only_prompt_keeps_everything(artifacts):
    out = artifacts["deep"].generate(None, "no picture", 4, ignore_eos=True, template="USER: {prompt} ASSISTANT:")
    assert out.image_span is None and np.array_equal(out.kept_positions, np.arange(len(out.prompt_ids)))
    assert len(out.cut_positions) == 3


def test_counts_equal_the_official_float_expressions():
    """``min(budget, N - 1)``, ``int(0.3 * pruned) + 1`` and ``int(S / 10) + 1`` in integer form, over every image
    size up to 3000 tokens and the official tables; version 2 recycles nothing."""
    for retain in (192, 128, 96, 64):
        method = SparseVLM(retain=retain)
        for image in range(1, 3000):
            present = image
            for budget, stage in zip(method.budgets, method.stages(image), strict=True):
                kept = min(budget, present - 1)
                recycled = int((present - kept) * 0.3) + 1
                assert (stage.kept, stage.recycled, stage.clusters) == (kept, recycled, int(recycled / 10) + 1)
                present = kept + stage.clusters
    assert SparseVLM(version=2).stages(576)[0].clusters == 0 and SparseVLM().stages(0)[0].kept == 0


def test_dpc_knn_merges_separated_groups():
    """Three well separated groups of tokens: three centres, each cluster token the mean of one group."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0] * 8, [10.0] * 8, [-10.0] * 8])
    tokens = torch.cat([c + 0.01 * torch.randn(7, 8, generator=generator) for c in centres])
    merged = dpc_knn(tokens, 3, torch.zeros(21))
    means = tokens.reshape(3, 7, 8).mean(1)
    order = torch.argsort(merged[:, 0])
    assert torch.allclose(merged[order], means[torch.argsort(means[:, 0])], atol=1e-5)


def test_graphs_lint_clean_and_inspect(artifacts, capsys):
    manifest = artifacts["deep"].manifest
    assert all(entry["ok"] for entry in manifest.lint.values()), manifest.lint
    assert {"image_positions", "density_noise"} <= {v["name"] for v in manifest.io["prefill"]["inputs"]}
    decode_inputs = {v["name"] for v in manifest.io["decode"]["inputs"]}
    assert {"pruned_cache_position_2", "pruned_position_ids_2"} <= decode_inputs
    prefill = ir.load(artifacts["deep"].path / "prefill.onnx")
    ops = [n for n in prefill.graph]
    assert {"TopK", "ArgMin", "ReduceL2"} <= {n.op_type for n in ops}
    assert not {n.op_type for n in ops} & {"NonZero", "Loop", "Unique", "RandomUniformLike", "RandomUniform"}
    assert all("reduction" not in n.attributes for n in ops if n.op_type == "ScatterElements")
    assert main(["inspect", str(artifacts["deep"].path)]) == 0
    assert "[41, 25, 13] of 64 image tokens" in capsys.readouterr().out
    assert "min(budget, N - 1) + the DPC-kNN" in SparseVLM(layers=[0], budgets=[30]).explain({"layers": 2}, {})


def _bound(model: ir.Model, axes: dict[str, int]) -> ir.Model:
    """Every symbolic dimension of ``model`` (expressions of ``axes``) evaluated."""
    names, known = {"min": min, "max": max, **axes}, {}
    for value in [*model.graph.inputs, *(v for node in model.graph for v in node.outputs)]:
        if value.shape is not None:
            for d in value.shape:
                if not isinstance(d, int) and d.value not in known:
                    known[d.value] = eval(d.value, {"__builtins__": {}}, names)
            value.shape = ir.Shape([d if isinstance(d, int) else known[d.value] for d in value.shape])
    return model


def test_plan_counts_what_the_prefill_graph_computes(artifacts):
    from tokensieve.graph_passes.macs import count_macs
    from tokensieve.plan.mllm import plan_artifact

    prompt, rows = plan_artifact(artifacts["deep"], 20)
    prefill = _bound(ir.load(artifacts["deep"].graph_path("prefill")), {"sequence": prompt.length, "image_tokens": 64})
    assert count_macs(prefill) == rows[-1].prefill_macs
    method = SparseVLM(layers=[0, 1, 2], budgets=[40, 24, 12])
    assert rows[-1].tokens_per_layer == [prompt.length, *_after(method, prompt.length, 64)]


def test_plan_at_llava_15_7b_geometry(capsys):
    """The official setting (layers 2, 6, 15 of 32; retain 192) through the declaration, and the CLI on the 7B-shapes
    preset (2 decoder layers: one cut after layer 0)."""
    cost = SparseVLM().plan(PlanInput(32, 32, 128, 576, 636, 256, 1024))
    assert cost.tokens == [636] * 3 + [369] * 4 + [264] * 9 + [173] * 16
    assert cost.cached == [t + 256 for t in cost.tokens] and cost.slots == 892
    assert cost.scoring == 576 * 636 * 4096 + 636**2 + 369**2 + 264**2 + (9 * 83 + 4 * 33 + 3 * 29) * 4096
    assert SparseVLM(version=2).plan(PlanInput(32, 32, 128, 576, 636, 256, 1024)).tokens[-1] == 636 - 576 + 118
    assert main(["plan", "hf:llava-1.5-7b-shapes", "--method", "sparsevlm(layers=[0], budgets=[192])"]) == 0
    assert "636 264" in capsys.readouterr().out


def test_bench_drives_the_method_graphs(artifacts):
    assert_bench_runs(artifacts["next"])


def test_bad_requests_are_typed_errors(tmp_path):
    with pytest.raises(MethodSpecError, match="pruning layer 15 is out of range; this decoder has 2 layers"):
        tokensieve.export("hf:llava-tiny", "sparsevlm()", out=tmp_path / "out")
    with pytest.raises(MethodSpecError, match="official budget table has 3 entries"):
        SparseVLM(layers=[0])
    with pytest.raises(MethodSpecError, match="budgets must list one image-token count"):
        SparseVLM(layers=[0, 1], budgets=[10])
    with pytest.raises(MethodSpecError, match="retain must be one of"):
        SparseVLM(retain=100)
    with pytest.raises(MethodSpecError, match="no original position; use positions='contiguous' or version=2"):
        SparseVLM(positions="original")
    with pytest.raises(MethodSpecError, match="version must be 1"):
        SparseVLM(version=3)
    assert not (tmp_path / "out").exists()
    assert (
        main(
            ["export", "hf:llava-tiny", "--method", "sparsevlm(layers=[1], budgets=[8])", "--out", str(tmp_path / "x")]
        )
        == 2
    )
