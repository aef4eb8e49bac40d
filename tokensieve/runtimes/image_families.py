"""The host side of each MLLM family, torch-free: its numpy image processor and image-token layout, looked up by
the manifest's ``host["kind"]`` (the family's Hugging Face ``model_type``).

A family's entry says how an image becomes the vision graph's input tiles (``patches``), how the vision graph's
output becomes the image's features in prompt order (``pack``), how many positions and vision runs an image of a
given size takes (``count``, for ``plan``), the features one vision run gives (``tile_tokens``), whether the
artifact carries LLaVA-NeXT's ``image_newline`` row separator, and how many tiles ``bench`` times the vision graph
on. A family whose vision graphs depend on the image's grid (Qwen-VL) gives ``graphs`` instead of ``patches`` and
``pack``: the object that runs them (``encode(image) -> (features [N, D], grid)``). ``positions`` gives the rotary
position ids of a prompt (``[rows, T]``, and the offset decoding adds to the sequence index): one row counting up
(the default), or Qwen-VL's three mRoPE rows. The converter side of a family is
:mod:`tokensieve.converters.families`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokensieve.errors import ArtifactError
from tokensieve.runtimes import internvl_image, llava_image, mrope, qwen_image
from tokensieve.runtimes.qwen_image import DEFAULT_SIZE
from tokensieve.runtimes.qwen_vision import QwenVision, profile_axes, tower_macs


def sequence_positions(ids: np.ndarray, host: dict[str, Any], grids: list) -> tuple[np.ndarray, int]:
    """One row of position ids counting up from 0, no decoding offset (every family but mRoPE's)."""
    return np.arange(len(ids), dtype=np.int64)[None], 0


@dataclass(frozen=True)
class ImageFamily:
    count: Callable[[dict[str, Any], tuple[int, int] | None], tuple[int, int]]  # -> (positions, vision runs)
    tile_tokens: Callable[[dict[str, Any]], int]  # features of one vision run
    most_tiles: Callable[[dict[str, Any]], int]  # vision runs of the largest image (TensorRT profile maximum)
    patches: Callable[[np.ndarray, dict[str, Any]], list[np.ndarray]] | None = None  # uint8 HWC -> [3, S, S] tiles
    pack: Callable[..., np.ndarray] | None = None  # (features [P, n, D], size, host, newline) -> [N, D]
    graphs: Callable[..., Any] | None = None  # (directory, graph files, host, runner options) -> .encode(image)
    positions: Callable[[np.ndarray, dict[str, Any], list], tuple[np.ndarray, int]] = sequence_positions
    profile_axes: Callable[[dict[str, Any]], dict[str, tuple[int, int, int]]] = lambda host: {}  # TensorRT ranges
    vision_macs: Callable[..., int] | None = None  # (vision sizes, host, size) -> MACs (default: CLIP-style rule)
    varies: bool = True  # the count depends on the image size
    newline: bool = False  # the artifact holds image_newline.npy
    bench_tiles: int = 1  # vision runs ``bench`` times together


QWEN_VL = ImageFamily(
    count=qwen_image.count,
    tile_tokens=lambda host: qwen_image.count(host, None)[0],
    most_tiles=lambda host: 1,
    graphs=QwenVision,
    positions=mrope.rope_index,
    profile_axes=profile_axes,
    vision_macs=lambda vision, host, size: tower_macs(vision, *qwen_image.patch_grid(size or DEFAULT_SIZE, host)[1:]),
)
IMAGE_FAMILIES: dict[str, ImageFamily] = {
    "llava": ImageFamily(
        llava_image.single_count,
        llava_image.crop_tokens,
        lambda host: 1,
        llava_image.llava_patches,
        llava_image.pack_single,
        varies=False,
    ),
    "llava_next": ImageFamily(
        llava_image.anyres_count,
        llava_image.crop_tokens,
        llava_image.most_crops,
        llava_image.anyres_patches,
        llava_image.pack_anyres,
        newline=True,
        bench_tiles=5,  # thumbnail + a 2x2 grid
    ),
    "internvl": ImageFamily(
        internvl_image.count,
        lambda host: host["tile_tokens"],
        lambda host: host["max_tiles"] + (host["max_tiles"] > 1),  # the grid + thumbnail
        internvl_image.patches,
        internvl_image.pack,
        bench_tiles=5,  # a 2x2 grid + thumbnail
    ),
    "qwen2_5_vl": QWEN_VL,
    "qwen2_vl": QWEN_VL,
}


def image_family(host: dict[str, Any]) -> ImageFamily:
    """The entry of ``host["kind"]``; an artifact of another family is an :class:`ArtifactError`."""
    kind = host.get("kind")
    if kind not in IMAGE_FAMILIES:
        raise ArtifactError(
            f"this artifact's MLLM family {kind!r} has no host-side image processor here; supported: "
            f"{', '.join(IMAGE_FAMILIES)} (re-export it with this version, or use the version that wrote it)"
        )
    return IMAGE_FAMILIES[kind]


def preprocess(image: Any, host: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    """``(pixel_values [P, 3, H, W] float32, original (height, width))`` of one image."""
    array = llava_image.load_image(image)
    return np.stack(image_family(host).patches(array, host)), array.shape[:2]


def pack_features(
    features: np.ndarray, size: tuple[int, int], host: dict[str, Any], newline: np.ndarray | None
) -> np.ndarray:
    """Vision-graph output ``[P, n, D]`` -> the image's token features ``[N, D]`` in prompt order."""
    return image_family(host).pack(features, size, host, newline)
