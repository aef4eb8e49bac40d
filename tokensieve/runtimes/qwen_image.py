"""Host-side image handling of Qwen2-VL / Qwen2.5-VL in numpy: how many patches and image tokens an image becomes,
its ``pixel_values`` and the expanded prompt, as Hugging Face's ``Qwen2VLImageProcessor`` (the torchvision backend
the auto classes pick) and ``Qwen2_5_VLProcessor`` compute them.

The processor resizes every image to a grid the model can take (``smart_resize``): both sides a multiple of
``patch_size * merge_size`` (28 pixels), each side rounded to the nearest multiple, then the whole image scaled so
that its area lies within ``[min_pixels, max_pixels]`` (keeping the aspect ratio as far as whole multiples allow).
The vision tower cuts the resized image into ``patch_size`` patches (a still image is repeated over the
``temporal_patch_size`` frames of one temporal patch) and merges each ``merge_size x merge_size`` block of patches
into one image token for the language model.

``preprocess`` resizes with the processor's filter (antialiased bicubic on 8-bit pixels, ``runtimes/resample.py``),
rescales and normalises in float32 (``(x - 255 mean) / (255 std)``, the processor's fused form), and flattens the
patches in the order the vision tower reads them: ``merge_size x merge_size`` blocks of patches row-major over the
merged grid, patches row-major inside a block, and each patch as ``[channel, frame, row, column]`` with the still
image repeated over the ``temporal_patch_size`` frames. ``expand_prompt`` repeats each ``<|image_pad|>`` of a
prompt once per image token of its image.

``host`` is the preprocessing dictionary of a Qwen-VL source (``converters/qwen_vl.py``): ``patch_size``,
``merge_size``, ``temporal_patch_size``, ``min_pixels``, ``max_pixels``, ``mean``, ``std``, ``image_token``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tokensieve.errors import InputError
from tokensieve.runtimes.llava_image import load_image
from tokensieve.runtimes.resample import resize_bicubic

MAX_ASPECT = 200  # the processor refuses more elongated images
DEFAULT_SIZE = (672, 672)  # what ``plan`` assumes without an image size: 576 image tokens, as many as LLaVA-1.5's


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The ``(height, width)`` the processor resizes an image of ``height x width`` to: multiples of ``factor``
    nearest to the original sides, scaled down (floor) above ``max_pixels`` or up (ceil) below ``min_pixels``."""
    if min(height, width) <= 0:
        raise InputError(f"an image of {height}x{width} pixels has no area; give a non-empty image")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise InputError(
            f"an image of {height}x{width} pixels has an aspect ratio above {MAX_ASPECT}, which Qwen-VL's "
            "processor refuses; crop or pad it first"
        )
    resized_h = round(height / factor) * factor
    resized_w = round(width / factor) * factor
    if resized_h * resized_w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        resized_h = max(factor, math.floor(height / scale / factor) * factor)
        resized_w = max(factor, math.floor(width / scale / factor) * factor)
    elif resized_h * resized_w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        resized_h = math.ceil(height * scale / factor) * factor
        resized_w = math.ceil(width * scale / factor) * factor
    return resized_h, resized_w


def patch_grid(size: tuple[int, int], host: dict[str, Any]) -> tuple[int, int, int]:
    """``(temporal, rows, columns)`` of patches of a still image of ``size = (height, width)`` (the processor's
    ``image_grid_thw``)."""
    patch = host["patch_size"]
    height, width = smart_resize(*size, patch * host["merge_size"], host["min_pixels"], host["max_pixels"])
    return 1, height // patch, width // patch


def image_tokens(size: tuple[int, int], host: dict[str, Any]) -> int:
    """Image tokens (``<|image_pad|>`` positions) of one still image of ``size``."""
    temporal, rows, columns = patch_grid(size, host)
    return temporal * rows * columns // host["merge_size"] ** 2


def count(host: dict[str, Any], size: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(image tokens, vision runs)`` of one still image of ``size`` (default :data:`DEFAULT_SIZE`): one run."""
    return image_tokens(size or DEFAULT_SIZE, host), 1


def patchify(image: np.ndarray, host: dict[str, Any]) -> np.ndarray:
    """A normalised float32 ``[C, H, W]`` image (sides multiples of ``patch_size * merge_size``) as the vision
    tower's ``pixel_values [rows * columns, C * T * P * P]`` (see the module docstring)."""
    patch, merge, frames = host["patch_size"], host["merge_size"], host["temporal_patch_size"]
    channels, height, width = image.shape
    rows, columns = height // patch, width // patch
    blocks = image.reshape(channels, rows // merge, merge, patch, columns // merge, merge, patch)
    blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)  # block row, block column, row, column, C, P, P
    repeated = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], frames, patch, patch))
    return np.ascontiguousarray(repeated).reshape(rows * columns, channels * frames * patch * patch)


def normalise(image: np.ndarray, host: dict[str, Any]) -> np.ndarray:
    """uint8 ``[H, W, C]`` -> float32 ``[C, H, W]``, ``(x - 255 mean) / (255 std)`` in float32."""
    mean = np.asarray(host["mean"], np.float32) * np.float32(255)
    std = np.asarray(host["std"], np.float32) * np.float32(255)
    return ((image.astype(np.float32) - mean) / std).transpose(2, 0, 1)


def preprocess(image: Any, host: dict[str, Any], grid: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple]:
    """``(pixel_values [rows * columns, C * T * P * P], (1, rows, columns))`` of one still image (a path, a PIL
    image or a uint8 array), resized as the processor resizes it, or to ``grid = (rows, columns)`` patches (a
    bucket) when given."""
    array = load_image(image)
    patch = host["patch_size"]
    if grid is None:
        grid = patch_grid(array.shape[:2], host)[1:]
    elif any(side % host["merge_size"] for side in grid):
        raise InputError(f"a grid of {grid[0]}x{grid[1]} patches is not a multiple of merge_size {host['merge_size']}")
    resized = resize_bicubic(array, grid[0] * patch, grid[1] * patch)
    return patchify(normalise(resized, host), host), (1, *grid)


def expand_prompt(text: str, grids: Sequence[Sequence[int]], host: dict[str, Any]) -> str:
    """``text`` with its ``i``-th image token repeated once per image token of ``grids[i] = (t, rows, columns)``."""
    token = host["image_token"]
    parts = text.split(token)
    if len(parts) - 1 != len(grids):
        raise InputError(
            f"the prompt holds {len(parts) - 1} {token} tokens for {len(grids)} images; put one {token} "
            "(inside <|vision_start|>...<|vision_end|>) where each image goes"
        )
    counts = [math.prod(grid) // host["merge_size"] ** 2 for grid in grids]
    return parts[0] + "".join(token * n + part for n, part in zip(counts, parts[1:], strict=True))
