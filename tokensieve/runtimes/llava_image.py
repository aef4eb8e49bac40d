"""Host-side image handling of LLaVA and LLaVA-NeXT in numpy (and PIL for the bicubic resize), no torch.

``preprocess`` reproduces Hugging Face's PIL image processors (``LlavaImageProcessorPil``,
``LlavaNextImageProcessorPil``): optional pad-to-square with the mean colour (LLaVA ``do_pad``), shortest-edge
bicubic resize, centre crop, rescale by 1/255, normalise. For LLaVA-NeXT (AnyRes) the image is first resized to the
best grid resolution (``select_best_resolution``), padded to it, cut into crops, and preceded by a resized copy of
the whole image (the "thumbnail"). ``pack_features`` then does what ``LlavaNextModel.pack_image_features`` does with
the vision graph's output: arrange the crops' features on the grid, remove the padding rows/columns
(``unpad_image``), append ``image_newline`` to every row and prepend the thumbnail's features.

``host`` is the preprocessing dictionary an MLLM artifact's manifest records (see ``converters/llava.py``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from tokensieve.errors import InputError

RESCALE = 1 / 255


def load_image(image: Any) -> np.ndarray:
    """An RGB ``uint8 [H, W, 3]`` array from a path, a PIL image or an array (HWC, or gray HW)."""
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        try:
            with Image.open(image) as opened:
                return np.asarray(opened.convert("RGB"))
        except (OSError, ValueError) as e:  # missing file, not an image (PIL's UnidentifiedImageError is an OSError)
            raise InputError(f"cannot read image {os.fspath(image)!r}: {e}") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise InputError(f"expected a uint8 RGB image [H, W, 3], got {array.dtype} {list(array.shape)}")
    return array[..., :3]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC))


def _resize_shortest_edge(image: np.ndarray, edge: int) -> np.ndarray:
    height, width = image.shape[:2]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return _resize(image, *((new_long, edge) if width <= height else (edge, new_long)))


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h < height or w < width:  # too small: zero-pad around it first, as the HF processor does
        top, left = math.ceil((max(height, h) - h) / 2), math.ceil((max(width, w) - w) / 2)
        padded = np.zeros((max(height, h), max(width, w), image.shape[2]), image.dtype)
        padded[top : top + h, left : left + w] = image
        image, h, w = padded, *padded.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return image[top : top + height, left : left + width]


def _normalise(image: np.ndarray, host: dict[str, Any]) -> np.ndarray:
    """uint8 HWC -> float32 CHW, rescaled and normalised the way the HF processors do it (float64 rescale)."""
    scaled = (image.astype(np.float64) * RESCALE).astype(np.float32)
    mean, std = np.asarray(host["mean"], np.float32), np.asarray(host["std"], np.float32)
    return ((scaled - mean) / std).transpose(2, 0, 1)


def _pad_to_square(image: np.ndarray, mean: list[float]) -> np.ndarray:
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    square = np.empty((side, side, 3), np.uint8)
    square[:] = [int(m * 255) for m in mean]
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = image
    return square


def _clip_patch(image: np.ndarray, host: dict[str, Any]) -> np.ndarray:
    resized = _resize_shortest_edge(image, host["shortest_edge"])
    return _normalise(_center_crop(resized, *host["crop"]), host)


def select_best_resolution(size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """The grid resolution ``(h, w)`` that keeps the most of the image and wastes the least (LLaVA-NeXT)."""
    height, width = size
    best, best_effective, best_waste = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = ph * pw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ph, pw), effective, waste
    return best


def _fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Aspect-preserving size that fits ``target`` (``get_patch_output_size``)."""
    (height, width), (th, tw) = size, target
    if tw / width < th / height:
        return min(math.ceil(height * tw / width), th), tw
    return th, min(math.ceil(width * th / height), tw)


def _anyres_patches(image: np.ndarray, host: dict[str, Any]) -> list[np.ndarray]:
    size = image.shape[:2]
    target = select_best_resolution(size, host["grid_pinpoints"])
    fitted = _resize(image, *_fit_size(size, target))
    (pad_y, rem_y), (pad_x, rem_x) = divmod(target[0] - fitted.shape[0], 2), divmod(target[1] - fitted.shape[1], 2)
    canvas = np.pad(fitted, ((pad_y, pad_y + rem_y), (pad_x, pad_x + rem_x), (0, 0)))
    side = host["crop"][0]
    crops = [canvas[i : i + side, j : j + side] for i in range(0, target[0], side) for j in range(0, target[1], side)]
    edge = host["shortest_edge"]
    return [_resize(image, edge, edge), *crops]


def preprocess(image: Any, host: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    """``(pixel_values [P, 3, H, W] float32, original (height, width))``; P = 1 for LLaVA."""
    array = load_image(image)
    if host["kind"] == "llava_next":
        patches = [_clip_patch(p, host) for p in _anyres_patches(array, host)]
    else:
        patches = [_clip_patch(_pad_to_square(array, host["mean"]) if host["do_pad"] else array, host)]
    return np.stack(patches), array.shape[:2]


def _unpad(features: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Drop the rows or columns of ``features [D, H, W]`` that came from padding (``unpad_image``)."""
    (height, width), (current_h, current_w) = size, features.shape[1:]
    if width / height > current_w / current_h:
        new_height = int(round(height * (current_w / width), 7))
        pad = (current_h - new_height) // 2
        return features[:, pad : current_h - pad, :]
    new_width = int(round(width * (current_h / height), 7))
    pad = (current_w - new_width) // 2
    return features[:, :, pad : current_w - pad]


def pack_features(
    features: np.ndarray, size: tuple[int, int], host: dict[str, Any], newline: np.ndarray | None
) -> np.ndarray:
    """Vision-graph output ``[P, n, D]`` -> the image's token features ``[N, D]`` in prompt order."""
    if host["kind"] != "llava_next":
        return features.reshape(-1, features.shape[-1])
    base, crops = features[0], features[1:]
    dim = features.shape[-1]
    if not len(crops):
        return np.concatenate([base, newline[None]]) if newline is not None else base
    side = host["image_size"] // host["patch_size"]
    grid_h, grid_w = (r // host["image_size"] for r in select_best_resolution(size, host["grid_pinpoints"]))
    grid = crops.reshape(grid_h, grid_w, side, side, dim).transpose(4, 0, 2, 1, 3)
    grid = _unpad(grid.reshape(dim, grid_h * side, grid_w * side), size)
    if newline is not None:
        column = np.broadcast_to(newline[:, None, None], (dim, grid.shape[1], 1))
        grid = np.concatenate([grid, column], axis=2)
    return np.concatenate([base, grid.reshape(dim, -1).T])
