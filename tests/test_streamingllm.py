"""StreamingLLM in the fixed-capacity decode graph (a ring cache) and in the growing cache: parity with the eager
reference past the capacity, the visibility pass, the slot policy, errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from helpers import assert_bench_runs, assert_plan_matches_graphs

import tokensieve
from tokensieve.converters.families import build_mllm
from tokensieve.errors import MethodSpecError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.cache_visibility import CacheVisibilityPass
from tokensieve.methods.streamingllm import StreamingLLM
from tokensieve.parity.mllm import _hf_processor, default_cases
from tokensieve.reference.streamingllm import streaming_generate

CAPACITY = 128
LONG_PROMPT = "Describe the colors and the shapes in this picture, then count the objects on the left and right. " * 2


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    ring = tokensieve.export("hf:llava-tiny", "streamingllm(sink=4)", out=root / "ring", capacity=CAPACITY)
    plain = tokensieve.export("hf:llava-tiny", out=root / "plain", capacity=CAPACITY, growing_cache=False)
    return {"ring": ring, "plain": plain}


def _cases():
    """Two prompts that fit the capacity but overflow while decoding, one longer than the capacity itself."""
    host = build_mllm("llava-tiny").host
    cases = default_cases(host, 2, 0)
    return [*cases, (LONG_PROMPT, cases[0][1])]


def test_parity_past_the_capacity_fixed_ring_and_growing(artifacts):
    report = artifacts["ring"].parity(cases=_cases(), new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 6 and {c.cache for c in report.cases} == {"fixed", "growing"}
    assert all(c.prompt_tokens + 31 > CAPACITY for c in report.cases)  # every case evicts
    assert max(c.prompt_tokens for c in report.cases) > CAPACITY  # and one already after prefill
    assert all(c.tokens_match and c.new_tokens == 32 and c.logits_error < 1e-5 for c in report.cases)


def test_eviction_changes_the_generation_and_needs_no_capacity_check(artifacts):
    """The reference really evicts: a full-cache generation of the long prompt says something else."""
    built = build_mllm("llava-tiny")
    model = built.model
    model.generation_config.eos_token_id = None
    prompt, image = _cases()[-1]
    inputs = _hf_processor(built.host, built.tokenizer)(
        images=image, text=built.host["template"].format(prompt=prompt), return_tensors="pt"
    )
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=24, do_sample=False, min_new_tokens=0)
    streamed = streaming_generate(model, inputs, StreamingLLM(sink=4), CAPACITY, 24)
    assert streamed.ids != full[0, inputs["input_ids"].shape[1] :].tolist()
    out = artifacts["ring"].generate(image, prompt, 24, ignore_eos=True)  # no CapacityError
    assert out.ids == streamed.ids


def test_visibility_pass_reproduces_the_plain_decode_graph(artifacts, tmp_path):
    path = artifacts["plain"].path / "decode.onnx"
    model = ir.load(path)
    run_passes(model, [CacheVisibilityPass()])
    ir.save(model, tmp_path / "decode.onnx", external_data="decode.data")
    plain, ring = ort.InferenceSession(str(path)), ort.InferenceSession(str(tmp_path / "decode.onnx"))
    rng = np.random.default_rng(0)
    feeds = {"input_ids": np.array([[9]]), "position_ids": np.array([[40]]), "cache_position": np.array([40])}
    for item in plain.get_inputs()[3:]:
        feeds[item.name] = rng.standard_normal(item.shape, dtype=np.float32)
    expected = plain.run(None, feeds)
    same = ring.run(None, {**feeds, "visible_slots": np.array([41])})
    assert all(np.array_equal(a, b) for a, b in zip(expected, same, strict=True))
    wider = ring.run(None, {**feeds, "visible_slots": np.array([CAPACITY])})
    assert not np.allclose(wider[0], expected[0])  # the slots after the write position now count
    assert artifacts["ring"].manifest.lint["decode"]["ok"]


def test_ring_slots_and_retained_positions():
    method = StreamingLLM(sink=2)
    assert [method.slot(p, 6) for p in range(12)] == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 2, 3]
    assert method.retained(5, 6) == [0, 1, 2, 3, 4] and method.retained(9, 6) == [0, 1, 5, 6, 7, 8]
    for length in range(6, 20):  # the retained positions occupy distinct slots, and the newest evicts the oldest
        kept = method.retained(length, 6)
        assert sorted(method.slot(p, 6) for p in kept) == list(range(6))


def test_bad_streaming_requests_are_typed_errors(tmp_path):
    with pytest.raises(MethodSpecError, match="sink=63 leaves no recent window in a 64-slot cache"):
        tokensieve.export("hf:llava-tiny", "streamingllm(sink=63)", out=tmp_path / "o", capacity=64)
    with pytest.raises(MethodSpecError, match="sink must be a number of positions >= 0"):
        StreamingLLM(sink=-1)
    with pytest.raises(MethodSpecError, match="one decoder method"):
        tokensieve.export("hf:llava-tiny", "fastv(k=1) + streamingllm()", out=tmp_path / "o")
    with pytest.raises(MethodSpecError, match="works on an MLLM decoder"):
        tokensieve.export("timm:vit_tiny_patch16_224", "streamingllm()", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_plan_counts_what_the_graphs_compute(artifacts):
    """`tokensieve plan`: prefill MACs, decode-step MACs and cache bytes as the exported graphs have them."""
    for key in ["ring", "plain"]:
        assert_plan_matches_graphs(artifacts[key])


def test_bench_drives_the_method_graphs(artifacts):
    for key in ["ring"]:
        assert_bench_runs(artifacts[key])
