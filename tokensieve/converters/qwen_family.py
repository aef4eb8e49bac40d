"""Qwen2-VL and Qwen2.5-VL as MLLM families (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``).

The vision tower takes an image at (almost) its own resolution, so its graphs are made per grid: one static graph
per bucket grid (the tower's index tables folded in: what TensorRT takes) and one with a symbolic patch count that
takes the tables as inputs (ONNX Runtime, any grid) -- :mod:`tokensieve.converters.qwen_vision`. The host resizes an
image as the processor does (``runtimes/qwen_image.py``) and runs the bucket graph of that grid when there is one,
else the dynamic graph (or, without it, resizes to the nearest bucket).

The language model is Qwen2 with multimodal rotary positions (mRoPE): three position rows (temporal, height, width),
equal for text, the merged grid's coordinates for an image's tokens (``runtimes/mrope.py``). It runs in the shared
cache graphs of :mod:`tokensieve.converters.llava` with ``rope_rows = 3``: prefill takes ``position_ids [3, T]``
(a method that drops tokens gathers the columns of the kept ones, so they keep their positions), decode graphs add
``rope_delta`` to the sequence index (text after the image continues where the model says, whatever was dropped or
evicted).

Presets (``converters/qwen_vl.py``): ``hf:qwen2.5-vl-tiny``, ``hf:qwen2-vl-tiny`` (tests) and ``hf:qwen2.5-vl-small``
(benchmarks) with seeded random weights and a byte tokenizer; ``hf:qwen2.5-vl-3b-shapes`` / ``-7b-shapes`` (full
depth, for ``plan``); checkpoints through ``hf:PATH``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokensieve.converters.family import MllmFamily
from tokensieve.converters.llava import byte_tokenizer
from tokensieve.converters.qwen_vision import VisionGraph, export_bucket, export_dynamic
from tokensieve.converters.qwen_vl import QWEN_VL_PRESETS, QWEN_VL_TYPES, SPECIAL_TOKENS, host_config, preset_config
from tokensieve.converters.qwen_vl import vision_geometry as qwen_vision_geometry
from tokensieve.errors import InputError
from tokensieve.runtimes import qwen_image
from tokensieve.runtimes.qwen_vision import DYNAMIC, bucket_name

DEFAULT_ASPECTS = ((1, 1), (3, 4), (4, 3))  # default buckets: a typical image in these (height, width) ratios


def default_buckets(host: dict[str, Any]) -> list[tuple[int, int]]:
    """The grids the processor gives images of ``host["image_size"]`` pixels' area in :data:`DEFAULT_ASPECTS`."""
    sizes = [(h / (h * w) ** 0.5, w / (h * w) ** 0.5) for h, w in DEFAULT_ASPECTS]
    side = host["image_size"]
    return list(dict.fromkeys(qwen_image.patch_grid((round(side * h), round(side * w)), host)[1:] for h, w in sizes))


def check_buckets(buckets: Sequence[Sequence[int]], host: dict[str, Any]) -> list[tuple[int, int]]:
    """``buckets`` as ``(rows, columns)`` patch grids, both positive multiples of the merge size (a typed error
    naming the bad ones otherwise)."""
    grids = [tuple(int(side) for side in grid) for grid in buckets]
    merge = host["merge_size"]
    bad = [g for g in grids if len(g) != 2 or min(g) <= 0 or any(side % merge for side in g)]
    if not grids or bad:
        raise InputError(
            f"buckets must be (rows, columns) of patches, both positive multiples of merge_size {merge}; got "
            f"{bad or 'none'} (e.g. --buckets 16x16,16x24)"
        )
    return list(dict.fromkeys(grids))


def resolve_buckets(host: dict[str, Any], buckets: Sequence[Sequence[int]] | None) -> list[tuple[int, int]]:
    """The bucket grids to export: ``buckets`` checked, or :func:`default_buckets`."""
    return default_buckets(host) if buckets is None else check_buckets(buckets, host)


def vision_graphs(model, host: dict[str, Any], opset: int, grids: list[tuple[int, int]]) -> dict[str, Any]:
    """``vision_<rows>x<columns>`` per bucket grid and ``vision_dynamic``."""
    tower = model.model.visual
    graphs = {bucket_name(grid): export_bucket(tower, host, grid, opset) for grid in grids}
    graphs[DYNAMIC] = export_dynamic(tower, host, grids[0], opset)
    return graphs


def tokenizer():
    """A byte-level tokenizer with ChatML's and Qwen-VL's special tokens (presets; no hub)."""
    return byte_tokenizer(SPECIAL_TOKENS)


def hf_processor(host: dict[str, Any], tokenizer):
    """The Hugging Face processor a Qwen-VL artifact is held to: ``Qwen2_5_VLProcessor`` / ``Qwen2VLProcessor``
    with ``Qwen2VLImageProcessor`` (the torchvision backend the auto classes pick) at the host's pixel bounds."""
    import transformers

    images = transformers.Qwen2VLImageProcessor(
        min_pixels=host["min_pixels"],
        max_pixels=host["max_pixels"],
        patch_size=host["patch_size"],
        temporal_patch_size=host["temporal_patch_size"],
        merge_size=host["merge_size"],
        image_mean=host["mean"],
        image_std=host["std"],
    )
    cls = transformers.Qwen2_5_VLProcessor if host["kind"] == "qwen2_5_vl" else transformers.Qwen2VLProcessor
    return cls(image_processor=images, tokenizer=tokenizer, video_processor=transformers.Qwen2VLVideoProcessor())


def image_tokens(host: dict[str, Any]) -> dict[str, Any]:
    """How many positions one image takes: its processor grid, merged (``per_crop``: an image of the typical
    side, one vision run)."""
    side = host["image_size"]
    rule = f"the processor's grid (min_pixels..max_pixels) / merge_size² per image; per_crop: a {side}² image"
    return {"per_crop": qwen_image.image_tokens((side, side), host), "varies_with_image_size": True, "rule": rule}


def _family(kind: str, title: str) -> MllmFamily:
    return MllmFamily(
        kind=kind,
        title=title,
        model_class=QWEN_VL_TYPES[kind],
        presets={n: p for n, p in QWEN_VL_PRESETS.items() if p.get("model_type", "qwen2_5_vl") == kind},
        preset_config=preset_config,
        host=host_config,
        vision=lambda model, cls_scores: VisionGraph(model.model.visual),
        tokenizer=tokenizer,
        hf_processor=hf_processor,
        vision_geometry=qwen_vision_geometry,
        image_tokens=image_tokens,
        layout="mrope",
        vision_graphs=vision_graphs,
        buckets=resolve_buckets,
        rope_rows=3,
    )


QWEN2_5_VL = _family("qwen2_5_vl", "Qwen2.5-VL")
QWEN2_VL = _family("qwen2_vl", "Qwen2-VL")
