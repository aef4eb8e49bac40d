"""RazorAttention in exported MLLM graphs: parity with the eager reference (cache layout per layer and KV head,
logits, 32 greedy tokens) on LLaVA and LLaVA-NeXT, the retrieval heads export found against the eager probe, the
compensation tokens' values, the counts, plan at the 7B geometry, bench, lint and errors."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_bench_runs, assert_plan_matches_graphs, prefill_case

import tokensieve
from tokensieve.converters.families import build_mllm
from tokensieve.errors import CapacityError, MethodSpecError, PromptError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.razor import HeadClassCachePass
from tokensieve.methods import methods_from_dicts, parse_methods
from tokensieve.methods.decoder import DecoderContext
from tokensieve.methods.razor import COMPENSATION, UNUSED, RazorAttention
from tokensieve.plan.mllm import format_mllm_plan, plan_mllm
from tokensieve.reference.razor import find_retrieval_heads, razor_generate
from tokensieve.runtimes.razor import head_class_slots

METHOD = "razor(window=8, ratio=5, probe=32, induction=0.25, new_tokens=32)"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("razor")
    llava = tokensieve.export("hf:llava-tiny", METHOD, out=root / "llava", capacity=192)
    nxt = tokensieve.export("hf:llava-next-tiny", METHOD, out=root / "next", capacity=448)
    return {"llava": llava, "next": nxt}


def _method(artifact) -> RazorAttention:
    return methods_from_dicts(artifact.manifest.methods)[0]


def test_parity_both_presets_32_tokens(artifacts):
    for key, count in (("llava", 2), ("next", 1)):
        report = artifacts[key].parity(count=count, new_tokens=32)
        assert report.ok, report.text()
        assert len(report.cases) == count and all(c.cache == "fixed" for c in report.cases)
        for case in report.cases:
            assert case.kept_match and case.kept_tokens == case.prompt_tokens + 1
            assert case.tokens_match and case.new_tokens == 32 and case.logits_error < 1e-5
            assert _method(artifacts[key]).dropped(case.prompt_tokens) > 50  # the compensation token holds many
        assert all(entry["ok"] for entry in artifacts[key].manifest.lint.values())


def test_retrieval_heads_are_the_eager_probes_and_mixed(artifacts):
    """The heads export found on the graphs (ONNX Runtime) are the ones the eager probe finds; both classes exist."""
    for key, preset in (("llava", "llava-tiny"), ("next", "llava-next-tiny")):
        method = _method(artifacts[key])
        assert method.heads and len(method.heads) < 4  # 2 layers x 2 KV heads
        assert find_retrieval_heads(build_mllm(preset).model, replace(method, heads=None)) == method.heads


def test_layout_and_compensation_tokens_match_the_eager_cache(artifacts):
    """Level-2 check: the graph's prompt cache is the eager layout entry by entry; compensation keys/values equal the
    eager means of the dropped positions; another head class gives other positions (what parity would catch)."""
    artifact, method = artifacts["llava"], _method(artifacts["llava"])
    built, inputs, ids, present, extras = prefill_case(artifact, "llava-tiny", 3)
    eager = razor_generate(built.model, inputs, method, 1)
    positions = extras["cache_positions"]
    np.testing.assert_array_equal(positions, eager.cache_positions.numpy())
    length, sink = len(ids), method.sink
    for layer, head in np.ndindex(2, 2):
        retrieval = (layer, head) in method.heads
        assert (positions[layer, head, sink] == COMPENSATION) != retrieval
        assert (positions[layer, head] == UNUSED).sum() == (1 if retrieval else method.dropped(length))
        if not retrieval:
            for kind in (0, 1):
                graph = present[2 * layer + kind][0, head, sink]
                np.testing.assert_allclose(graph, eager.compensation[layer, kind, head].numpy(), atol=1e-5)
    other = ((0, 0),) if method.heads != ((0, 0),) else ((1, 1),)
    wrong = razor_generate(built.model, inputs, replace(method, heads=other), 1)
    assert not np.array_equal(wrong.cache_positions.numpy(), positions)


def test_counts_layout_and_choice():
    method = RazorAttention(sink=2, window=3, ratio=4)
    assert [method.recent(n) for n in (8, 12, 40)] == [3, 3, 10]
    assert [method.dropped(n) for n in (4, 5, 8, 40)] == [0, 0, 3, 28]
    assert method.layout(8, retrieval=False) == [0, 1, COMPENSATION, 5, 6, 7, UNUSED, UNUSED, UNUSED]
    assert method.layout(5, retrieval=False) == [0, 1, COMPENSATION, 2, 3, 4]
    assert method.layout(3, retrieval=True) == [0, 1, 2, UNUSED]
    probe = method.probe_ids(50)
    assert len(probe) == 512 and probe[:256] == probe[256:] and probe == method.probe_ids(50)
    chooser = RazorAttention(echo=Fraction(1, 8), induction=Fraction(1, 4))  # of 8 KV heads: 1 echo, 2 induction
    echo, induction = [0, 5, 1, 1, 0, 0, 0, 0], [0, 5, 0, 0, 3, 3, 0, 0]
    assert chooser.choose(echo, induction) == (1, 4)  # head 1 tops both; ties go to the lower index
    assert chooser.class_counts(64) == (8, 16)
    again = methods_from_dicts([RazorAttention(heads=[[1, 0], [0, 1]]).to_dict()])[0]
    assert again.heads == ((0, 1), (1, 0)) and again.induction == Fraction(14, 100)


def test_bad_requests_are_typed_errors(artifacts):
    with pytest.raises(MethodSpecError, match="echo must be a fraction of the KV heads in"):
        parse_methods("razor(echo=1.5)")
    with pytest.raises(MethodSpecError, match="ratio must be a positive integer"):
        parse_methods("razor(ratio=0)")
    with pytest.raises(MethodSpecError, match="probe must be at least 2 tokens"):
        parse_methods("razor(probe=1)")
    with pytest.raises(MethodSpecError, match="heads must be distinct"):
        parse_methods("razor(heads=[[0, 1], [0, 1]])")
    with pytest.raises(MethodSpecError, match="beyond the model's 2 decoder layers"):
        RazorAttention(heads=[[2, 0]]).validate(DecoderContext(2, "llava", "default", 64, 128))
    with pytest.raises(MethodSpecError, match=r"heads \[\(0, 2\)\] are not \(layer, kv_head\) pairs of this decoder"):
        prefill = ir.load(artifacts["llava"].path / "prefill.onnx")
        run_passes(prefill, [HeadClassCachePass(RazorAttention(heads=[[0, 2]]))])
    with pytest.raises(MethodSpecError, match="not known yet; they are found when exporting"):
        RazorAttention().retrieval(0, 2)
    with pytest.raises(PromptError, match="has 4 positions but non-retrieval heads keep sink=4 attention sinks"):
        head_class_slots(None, [np.zeros((1, 2, 5, 16), np.float32)], RazorAttention(heads=[]), None)


def test_plan_at_the_7b_geometry_and_on_the_artifact(artifacts):
    """Per head class: retrieval heads hold the whole prompt in the full capacity, the others sinks + recent + one
    compensation token in their own, smaller cache tensors; the MiB are what the decode graph allocates."""
    candidates = ["razor()", "razor(window=128, new_tokens=32)"]
    prompt, rows = plan_mllm("hf:llava-1.5-7b-shapes", candidates, new_tokens=32)
    none, paper, short = rows
    assert prompt.length == 636 and none.slots == paper.slots - 1 == 668  # + the compensation entry
    assert paper.cache_classes["retrieval"]["kv_heads"] == 10  # 2 layers x 32 KV heads: 1 echo + 9 induction
    assert paper.cache_classes["sinks + recent + compensation"]["positions"] == 668  # window 4000 > prompt: no drop
    assert paper.cache_classes["sinks + recent + compensation"]["slots"] == 669  # 4 + 4000 + 256 > 669: no saving
    local = short.cache_classes["sinks + recent + compensation"]  # 4 sinks + 128 recent + 1 + 32 new
    slots = 4 + 669 // 5 + 32  # sinks + L of a 669-position prompt + new tokens
    assert local == {"kv_heads": 54, "positions": 165, "slots": slots, "mib": 54 * slots * 2 * 128 * 4 / 2**20}
    assert short.cache_mib == (10 * 669 + 54 * slots) * 2 * 128 * 4 / 2**20 < 0.4 * none.cache_mib
    assert f"54 KV heads x 165 positions in {slots} slots" in format_mllm_plan(prompt, rows)
    assert_plan_matches_graphs(artifacts["llava"])


def test_decode_graph_caches_are_split_and_smaller(artifacts):
    """Each layer's retrieval heads and other heads have cache tensors of their own in the fixed decode graph (the
    others with ``local_capacity`` slots): the cache inputs sum to fewer bytes than the unreduced graph's."""
    for key in ("llava", "next"):
        artifact, method = artifacts[key], _method(artifacts[key])
        decoder = artifact.manifest.decoder
        capacity, size = decoder["capacity"], method.local_capacity(decoder["capacity"])
        assert size == 4 + capacity // 5 + 32 < capacity / 2
        decode = ir.load(artifact.graph_path("decode"))
        shapes = {v.name: tuple(v.shape.numpy()) for v in decode.graph.inputs if v.name.startswith("cache_")}
        dim = decoder["head_dim"]
        for layer, kind in np.ndindex(2, 2):
            name = f"cache_{('key', 'value')[kind]}_{layer}"
            retrieval = sum(method.retrieval(layer, 2))
            assert shapes.get(name) == ((1, retrieval, capacity, dim) if retrieval else None)
            assert shapes.get(f"{name}_local") == ((1, 2 - retrieval, size, dim) if retrieval < 2 else None)
        allocated = sum(4 * np.prod(shape) for name, shape in shapes.items() if name != "cache_position")
        unreduced = 2 * decoder["layers"] * decoder["kv_heads"] * capacity * dim * 4
        assert allocated == 4 * dim * 2 * (len(method.heads) * capacity + (4 - len(method.heads)) * size)
        assert allocated < 0.75 * unreduced
    with pytest.raises(CapacityError, match="non-retrieval heads' cache holds 74 slots"):
        artifacts["llava"].generate(prompt="Say something long.", max_new_tokens=80)


def test_bench_drives_the_method_graphs(artifacts):
    assert_bench_runs(artifacts["llava"])
