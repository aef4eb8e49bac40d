"""Host-side image geometry of Qwen2-VL / Qwen2.5-VL in pure Python: how many patches and image tokens an image
becomes, as Hugging Face's ``Qwen2VLImageProcessor`` decides it.

The processor resizes every image to a grid the model can take (``smart_resize``): both sides a multiple of
``patch_size * merge_size`` (28 pixels), each side rounded to the nearest multiple, then the whole image scaled so
that its area lies within ``[min_pixels, max_pixels]`` (keeping the aspect ratio as far as whole multiples allow).
The vision tower cuts the resized image into ``patch_size`` patches (a still image is repeated over the
``temporal_patch_size`` frames of one temporal patch) and merges each ``merge_size x merge_size`` block of patches
into one image token for the language model.

``host`` is the preprocessing dictionary of a Qwen-VL source (``converters/qwen_vl.py``): ``patch_size``,
``merge_size``, ``temporal_patch_size``, ``min_pixels``, ``max_pixels``.
"""

from __future__ import annotations

import math
from typing import Any

from tokensieve.errors import InputError

MAX_ASPECT = 200  # the processor refuses more elongated images


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
