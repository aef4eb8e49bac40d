"""InternVL3 as an MLLM family: the numpy tiling processor against Hugging Face's, greedy parity of the split graphs
with ``generate`` (one tile, several tiles + thumbnail, text only), decoder methods' kept positions against their
eager references, typed refusals, ``plan`` and ``bench``.

The torch -> ONNX step is memoised per graph for this module (the ``memo`` fixture): every artifact still goes
through ``tokensieve.export`` (method passes, manifest, lint) and ``parity``; only identical graphs (same module
class, same weights, same example shapes) are exported once, so the four method artifacts and the checkpoint
directory cost one extra decode graph."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from helpers import assert_bench_runs, assert_plan_matches_graphs

import tokensieve
from tokensieve.cli import main
from tokensieve.converters.families import build_mllm
from tokensieve.converters.sources import weights_digest
from tokensieve.deploy.build import symbol_ranges
from tokensieve.errors import MethodSpecError, PromptError, SourceError
from tokensieve.parity.mllm import _hf_processor
from tokensieve.runtimes.image_families import preprocess
from tokensieve.runtimes.internvl_image import count, tile_grid
from tokensieve.runtimes.llava import expand_placeholders

PRESET = "internvl3-tiny"
SIZES = [(64, 64), (40, 180), (150, 60), (100, 128), (20, 300), (300, 20), (7, 9), (200, 133)]
SMALL_CAPACITY = 48  # H2O(budget=47) and StreamingLLM: the prompts (60-110 positions) overflow it


@pytest.fixture(scope="module")
def built():
    return build_mllm(PRESET)


@pytest.fixture(scope="module")
def memo():
    """Export each distinct graph once: a copy of the first export of the same module class, weights and example
    shapes."""
    from tokensieve.converters import export as export_module

    original, cache = export_module.export_graph, {}

    def export_graph(module, args, inputs, outputs, **kwargs):
        flat = [a for arg in args for a in (arg if isinstance(arg, tuple) else (arg,))]
        shapes = tuple(tuple(a.shape) for a in flat)
        key = (type(module).__name__, weights_digest(module), shapes, tuple(outputs))
        if key not in cache:
            cache[key] = ir.to_proto(original(module, args, inputs, outputs, **kwargs))
        return ir.from_proto(cache[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "export_graph", export_graph)
        yield


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, memo):
    root = tmp_path_factory.mktemp("internvl")
    plain = tokensieve.export(f"hf:{PRESET}", out=root / "plain")
    methods = {
        "fastv": ("fastv(k=1, keep=0.5)", None),
        "snapkv": ("snapkv(budget=24, window=4)", None),
        "h2o": (f"h2o(budget={SMALL_CAPACITY - 1}, recent=8)", None),
        "streamingllm": ("streamingllm(sink=4)", SMALL_CAPACITY),
    }
    exported = {
        name: tokensieve.export(f"hf:{PRESET}", text, out=root / name, capacity=capacity, growing_cache=False)
        for name, (text, capacity) in methods.items()
    }
    return {"plain": plain, **exported, "root": root}


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _cases() -> list[tuple[str, np.ndarray | None]]:
    """One tile (square), 4 tiles + thumbnail (wide), and a text-only prompt (3 tiles + thumbnail, tall, is among
    the processor test's sizes)."""
    return [
        ("What is shown in this image?", _image(64, 64, 1)),
        ("Describe the colors and shapes.", _image(40, 180, 2)),
        ("Tell me a story about a photo.", None),
    ]


def test_tiles_and_pixels_match_the_hf_processor(built):
    """pixel_values (tiles row by row, thumbnail last) equal the HF InternVL processor's (PIL backend) for every
    size, and the runtime's prompt expansion (``<img>`` + context x tiles x 16 + ``</img>``) equals its ids."""
    host, tokenizer = built.host, built.tokenizer
    processor = _hf_processor(host, tokenizer)
    template = host["template"].format(prompt="Hi?")
    wrap = tuple(tokenizer.convert_tokens_to_ids(host["image_wrap"]))
    ids = np.asarray(tokenizer(template).input_ids)
    for height, width in SIZES:
        image = _image(height, width)
        expected = processor(images=image, text=template, return_tensors="np")
        pixels, size = preprocess(image, host)
        assert size == (height, width)
        assert pixels.shape == expected["pixel_values"].shape, (height, width)
        np.testing.assert_allclose(pixels, expected["pixel_values"], atol=1e-6, rtol=0)
        tokens, tiles = count(host, size)
        assert tiles == len(pixels) and tiles != 2  # a thumbnail follows every grid of more than one tile
        expanded = expand_placeholders(ids, host["image_token_id"], tokens, wrap)
        np.testing.assert_array_equal(expanded, expected["input_ids"][0])
    assert tile_grid((40, 180), host) == (4, 1) and tile_grid((150, 60), host) == (1, 3)
    assert tile_grid((64, 64), host) == (1, 1)
    assert tile_grid((100, 128), host) == (2, 2)  # ties with 1x1; the image covers more than half of 2x2's area


def test_parity_with_hf_generate_tiles_and_text_only(artifacts):
    report = artifacts["plain"].parity(cases=_cases(), new_tokens=32)
    assert report.ok, report.text()
    assert len(report.cases) == 6 and {c.cache for c in report.cases} == {"fixed", "growing"}
    assert [c.image_tokens for c in report.cases[::2]] == [16, 80, 0]  # 1 tile, 4 tiles + thumbnail, text only
    assert all(c.new_tokens == 32 and c.tokens_match and c.logits_error < 1e-5 for c in report.cases)
    manifest = artifacts["plain"].manifest
    assert manifest.host["kind"] == "internvl" and manifest.dynamic["vision"].startswith("patches")
    assert manifest.decoder["kv_heads"] == 2 and manifest.decoder["heads"] == 4  # grouped KV heads
    assert all(result["ok"] for result in manifest.lint.values()), manifest.lint
    assert symbol_ranges(artifacts["plain"])["patches"] == (1, 5, 5)  # TensorRT profile: up to 4 tiles + thumbnail


@pytest.mark.parametrize("name", ["fastv", "snapkv", "h2o", "streamingllm"])
def test_decoder_methods_keep_the_eager_positions(artifacts, name):
    report = artifacts[name].parity(cases=_cases()[1:2], new_tokens=32, caches=("fixed",))  # 4 tiles + thumbnail
    assert report.ok, report.text()
    if name != "streamingllm":  # the others report kept positions; StreamingLLM evicts (prompts > capacity)
        assert all(c.kept_match for c in report.cases), report.text()
    else:
        assert all(c.prompt_tokens > SMALL_CAPACITY for c in report.cases)
    assert report.cases[0].image_tokens == 80
    assert all(result["ok"] for result in artifacts[name].manifest.lint.values())


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("atp_llava(layers=[1])", "InternVL packs tiles and a thumbnail"),
        ("mustdrop(layers=[1])", "InternVL packs tiles and a thumbnail"),
        ("globalcom2", "InternVL packs tiles and a thumbnail"),
    ],
)
def test_methods_that_need_another_layout_are_refused(tmp_path, method, message):
    with pytest.raises(MethodSpecError, match=message):
        tokensieve.export(f"hf:{PRESET}", method, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_directory(built, memo, tmp_path):
    """``hf:PATH`` of a saved ``internvl`` checkpoint: weights, tokenizer (with its named image tokens) and
    processor config (6 tiles at most, another normalisation) are read, and the artifact holds parity."""
    built.model.save_pretrained(tmp_path / "ckpt")
    built.tokenizer.save_pretrained(tmp_path / "ckpt")
    processor = {"size": {"height": 64, "width": 64}, "max_patches": 6, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (tmp_path / "ckpt" / "preprocessor_config.json").write_text(json.dumps(processor))
    artifact = tokensieve.export(f"hf:{tmp_path / 'ckpt'}", out=tmp_path / "out", capacity=512, growing_cache=False)
    assert artifact.manifest.host["max_tiles"] == 6 and artifact.manifest.host["mean"] == [0.5] * 3
    report = artifact.parity(cases=[("Describe it.", _image(30, 200, 4))], new_tokens=32, caches=("fixed",))
    assert report.ok, report.text()
    assert report.cases[0].image_tokens == 7 * 16  # 6 x 1 tiles (the most allowed) + thumbnail


def test_bad_input_typed_errors(artifacts, tmp_path):
    runner = artifacts["plain"].llava_runner()
    host = runner.host
    context = host["image_token_id"]
    with pytest.raises(PromptError, match="2 image placeholders but the image gives 16"):
        runner.generate(_image(64, 64), input_ids=[4, context, context, 2], max_new_tokens=1)
    with pytest.raises(PromptError, match="no image was given"):
        runner.generate(None, input_ids=[4, context, 2], max_new_tokens=1)
    config = tmp_path / "blip"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(SourceError, match=r"'blip-2' is not supported; .* MLLMs: llava, llava_next, internvl, qwen"):
        tokensieve.export(f"hf:{config}", out=tmp_path / "out")


def test_plan_and_bench(artifacts, capsys):
    """plan's MACs are the graphs' (vision per tile x tiles, prefill, decode) for FastV; ``plan`` on InternVL3-2B
    shapes (config only) and ``bench`` on the tiny artifact run."""
    assert_plan_matches_graphs(artifacts["fastv"])
    assert main(["plan", "hf:internvl3-2b-shapes", "--method", "fastv(k=1, keep=0.5)", "--image-size", "448x896"]) == 0
    out = capsys.readouterr().out
    assert "fastv" in out and "768" in out  # 2 tiles + thumbnail x 256 tokens
    assert_bench_runs(artifacts["snapkv"])
