"""Qwen2.5-VL and Qwen2-VL as MLLM families: greedy parity of the split graphs with Hugging Face ``generate`` (an
image at a bucket grid, at other grids through the dynamic vision graph, above ``max_pixels``, text only), the
mRoPE positions (prefill's three rows, decode's ``rope_delta``), decoder methods' kept positions against their
eager references, typed refusals, ``plan`` and ``bench``."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_bench_runs

import tokensieve
from tokensieve.cli import main
from tokensieve.converters.families import build_mllm
from tokensieve.deploy.build import symbol_ranges
from tokensieve.errors import MethodSpecError, PromptError
from tokensieve.runtimes.mrope import rope_index

PRESET = "hf:qwen2.5-vl-tiny"
BUCKETS = [(12, 12)]  # a 158-pixel square image's grid (the preset's typical side)
SMALL_CAPACITY = 48  # StreamingLLM: the prompts (~130 positions) overflow it


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    plain = tokensieve.export(PRESET, out=root / "plain", buckets=BUCKETS)
    methods = {
        "fastv": ("fastv(k=1, keep=0.5)", None),
        "snapkv": ("snapkv(budget=24, window=4)", None),
        "h2o": ("h2o(budget=47, recent=8)", None),
        "streamingllm": ("streamingllm(sink=4)", SMALL_CAPACITY),
        "dyvte": ("dyvte(layers=[1])", None),
    }
    exported = {
        name: tokensieve.export(PRESET, text, out=root / name, capacity=capacity, growing_cache=False, buckets=BUCKETS)
        for name, (text, capacity) in methods.items()
    }
    return {"plain": plain, **exported}


def test_parity_with_hf_generate_buckets_native_grids_and_text_only(artifacts):
    cases = [
        ("What is shown in this image?", _image(158, 158, 1)),  # the bucket's grid: the static graph
        ("Describe the colors and shapes.", _image(100, 300, 2)),  # another grid: the dynamic graph
        ("Count the objects.", _image(600, 200, 3)),  # above max_pixels: resized down as the processor does
        ("Tell me a story about a photo.", None),
        ("Compare the two images.", [_image(158, 158, 4), _image(100, 300, 5)]),  # two grids in one prompt
    ]
    report = artifacts["plain"].parity(cases=cases, new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 10 and {c.cache for c in report.cases} == {"fixed", "growing"}
    assert [c.image_tokens for c in report.cases[::2]] == [36, 44, 52, 0, 36 + 44]
    assert all(c.new_tokens == 32 and c.tokens_match and c.logits_error < 1e-5 for c in report.cases)
    manifest = artifacts["plain"].manifest
    assert {"vision_12x12", "vision_dynamic"} <= set(manifest.graphs) and "vision_dynamic" in manifest.dynamic
    assert "vision_12x12" not in manifest.dynamic  # the bucket graphs are static (TensorRT)
    assert all(result["ok"] for result in manifest.lint.values()), manifest.lint
    ranges = symbol_ranges(artifacts["plain"])  # TensorRT: the dynamic vision graph over the processor's bounds
    assert ranges["tokens"] == (16, 36, 64) and ranges["4*tokens"] == (64, 144, 256)
    prefill, decode = (ir.load(artifacts["plain"].graph_path(key)) for key in ("prefill", "decode"))
    assert [d if isinstance(d, int) else str(d) for d in prefill.graph.inputs[1].shape] == [3, "sequence"]
    assert decode.graph.inputs[-1].name == "rope_delta"


def test_image_positions_are_mrope(artifacts):
    """The runtime's position table is the model's: an image's tokens at their grid coordinates, the text after it
    shifted by a negative rope delta (what makes parity above depend on the three rows)."""
    runner = artifacts["plain"].llava_runner()
    image = _image(100, 300, 2)
    _, chosen = runner.image_tokens(image)
    out = runner.generate(image, "Hi?", max_new_tokens=1)
    (start, end), grid = out.image_span, chosen["grid"]
    table, delta = rope_index(out.prompt_ids, runner.host, [grid])
    assert grid == (1, 8, 22) and end - start == 44 and delta == 11 - 44  # 4 x 11 merged tokens
    assert (table[0, start:end] == start).all() and table[1, end - 1] == start + 3 and table[2, end - 1] == start + 10
    assert (table[:, end] == start + 11).all()


@pytest.mark.parametrize("name", ["fastv", "snapkv", "h2o", "streamingllm", "dyvte"])
def test_decoder_methods_keep_the_eager_positions(artifacts, name):
    image = _image(100, 300, 2)
    report = artifacts[name].parity(cases=[("Describe the colors.", image)], caches=("fixed",))
    assert report.ok, report.text()
    if name != "streamingllm":  # the others report kept positions; StreamingLLM evicts (the prompt > capacity)
        assert all(c.kept_match for c in report.cases), report.text()
    else:
        assert all(c.prompt_tokens > SMALL_CAPACITY for c in report.cases)
    assert report.cases[0].image_tokens == 44
    assert all(result["ok"] for result in artifacts[name].manifest.lint.values())
    if name == "dyvte":  # decides on the host per image run
        with pytest.raises(PromptError, match="dyvte takes one image per prompt"):
            artifacts[name].generate([image, image], "Compare.", max_new_tokens=1)
    elif name == "fastv":  # the image tokens of both images are one set
        report = artifacts[name].parity(cases=[("Compare.", [image, _image(158, 158, 3)])], caches=("fixed",))
        assert report.ok and report.cases[0].kept_match and report.cases[0].image_tokens == 80, report.text()


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("atp_llava(layers=[1])", "Qwen-VL's image is one merged patch grid of any size"),
        ("mustdrop(layers=[1])", "works inside the vision graph, but Qwen2.5-VL's vision tower exports as one graph"),
        ("sparsevlm", "renumbers the positions after a cut"),
    ],
)
def test_methods_that_need_another_layout_are_refused(tmp_path, method, message):
    with pytest.raises(MethodSpecError, match=message):
        tokensieve.export(PRESET, method, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_input_typed_errors(artifacts, tmp_path):
    runner = artifacts["plain"].llava_runner()
    pad = runner.host["image_token_id"]
    with pytest.raises(PromptError, match="2 image placeholders but the image gives 36"):
        runner.generate(_image(158, 158), input_ids=[4, pad, pad, 2], max_new_tokens=1)
    with pytest.raises(MethodSpecError, match=r"--buckets .* apply to Qwen-VL's vision tower, not to LLaVA-1.5"):
        tokensieve.export("hf:llava-tiny", out=tmp_path / "out", buckets=[(12, 12)])
    with pytest.raises(tokensieve.errors.InputError, match="multiples of merge_size 2"):
        tokensieve.export(PRESET, out=tmp_path / "out", buckets=[(12, 13)])
    assert not (tmp_path / "out").exists()


def test_qwen2_vl_checkpoint_directory(tmp_path):
    """``hf:PATH`` of a saved Qwen2-VL checkpoint (no vision windows, the same mRoPE decoder): weights, tokenizer
    and processor config (other pixel bounds and normalisation) are read, and the artifact holds parity."""
    built = build_mllm("qwen2-vl-tiny")
    built.model.save_pretrained(tmp_path / "ckpt")
    built.tokenizer.save_pretrained(tmp_path / "ckpt")
    processor = {"min_pixels": 8 * 784, "max_pixels": 32 * 784, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (tmp_path / "ckpt" / "preprocessor_config.json").write_text(json.dumps(processor))
    artifact = tokensieve.export(f"hf:{tmp_path / 'ckpt'}", out=tmp_path / "q2", buckets=[(8, 8)], growing_cache=False)
    assert artifact.manifest.host["kind"] == "qwen2_vl" and artifact.manifest.host["max_pixels"] == 32 * 784
    report = artifact.parity(cases=[("Describe it.", _image(120, 260, 5))], caches=("fixed",))
    assert report.ok, report.text()
    assert report.cases[0].image_tokens == 24  # 8 x 12 patches within the checkpoint's 32 merged tokens


def test_plan_and_bench(artifacts, capsys):
    """``plan`` on Qwen2.5-VL-7B shapes (config only), ``bench`` on the tiny artifact (vision: one image) and
    ``inspect --load`` (what each graph costs to load)."""
    assert main(["plan", "hf:qwen2.5-vl-7b-shapes", "--method", "fastv(k=2, keep=0.5)", "--image-size", "448x896"]) == 0
    out = capsys.readouterr().out
    assert "fastv" in out and "512 image" in out  # 16 x 32 merged tokens
    assert_bench_runs(artifacts["fastv"])
    capsys.readouterr()
    assert main(["inspect", str(artifacts["fastv"].path), "--load", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["load"]  # per graph: session seconds, weights bound from the shared map
    graphs = artifacts["fastv"].manifest.graphs
    assert [r["graph"] for r in rows] == [path for key, path in graphs.items() if key != "external_data"]
    assert all(r["seconds"] > 0 and r["weights_mib"] > 0 and r["shared"] for r in rows)
