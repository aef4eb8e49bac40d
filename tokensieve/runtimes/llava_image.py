"""Host-side image handling of LLaVA and LLaVA-NeXT in numpy (and PIL for the bicubic resize), no torch.

The patch functions reproduce Hugging Face's PIL image processors (``LlavaImageProcessorPil``,
``LlavaNextImageProcessorPil``): optional pad-to-square with the mean colour (LLaVA ``do_pad``), shortest-edge
bicubic resize, centre crop, rescale by 1/255, normalise. For LLaVA-NeXT (AnyRes) the image is first resized to the
best grid resolution (``select_best_resolution``), padded to it, cut into crops, and preceded by a resized copy of
the whole image (the "thumbnail"). ``pack_anyres`` then does what ``LlavaNextModel.pack_image_features`` does with
the vision graph's output: arrange the crops' features on the grid, remove the padding rows/columns
(``unpad_image``), append ``image_newline`` to every row and prepend the thumbnail's features.

``host`` is the preprocessing dictionary an MLLM artifact's manifest records (see ``converters/llava.py``). The
family table (:mod:`tokensieve.runtimes.image_families`) picks these functions by ``host["kind"]``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from tokensieve.errors import InputError

RESCALE = 1 / 255
NEWLINE = -2  # marks image_newline among token indices (see emit_rows)


def eight_bit(image, mode: str = "RGB"):
    """``image`` (PIL) converted to ``mode``; 16-bit, 32-bit and float images are refused: PIL's conversion (which
    the Hugging Face processors use too) clips them to white or black instead of rescaling."""
    if image.mode.startswith(("I", "F")):
        raise InputError(
            f"an image in mode {image.mode} has more than 8 bits per channel, which converting to {mode} would clip; "
            "rescale it to 8-bit first"
        )
    return image.convert(mode)


def load_image(image: Any) -> np.ndarray:
    """An RGB ``uint8 [H, W, 3]`` array from a path, a PIL image or an array (HWC, or gray HW)."""
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        try:
            with Image.open(image) as opened:
                return np.asarray(eight_bit(opened))
        except (OSError, ValueError) as e:  # missing file, not an image (PIL's UnidentifiedImageError is an OSError)
            raise InputError(f"cannot read image {os.fspath(image)!r}: {e}") from None
    if isinstance(image, Image.Image):
        return np.asarray(eight_bit(image))
    given = np.asarray(image)
    array = np.repeat(given[..., None], 3, axis=2) if given.ndim == 2 else given
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise InputError(
            f"expected a uint8 image [H, W, 3] (or RGBA, or gray [H, W]), got {given.dtype} {list(given.shape)}"
        )
    if 0 in array.shape[:2]:
        raise InputError(f"the image is empty ({array.shape[0]}x{array.shape[1]} pixels)")
    return array[..., :3]


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC))


def _resize_shortest_edge(image: np.ndarray, edge: int) -> np.ndarray:
    height, width = image.shape[:2]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return resize(image, *((new_long, edge) if width <= height else (edge, new_long)))


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h < height or w < width:  # too small: zero-pad around it first, as the HF processor does
        top, left = math.ceil((max(height, h) - h) / 2), math.ceil((max(width, w) - w) / 2)
        padded = np.zeros((max(height, h), max(width, w), image.shape[2]), image.dtype)
        padded[top : top + h, left : left + w] = image
        image, h, w = padded, *padded.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return image[top : top + height, left : left + width]


def normalise(image: np.ndarray, host: dict[str, Any]) -> np.ndarray:
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
    return normalise(_center_crop(resized, *host["crop"]), host)


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
    fitted = resize(image, *_fit_size(size, target))
    (pad_y, rem_y), (pad_x, rem_x) = divmod(target[0] - fitted.shape[0], 2), divmod(target[1] - fitted.shape[1], 2)
    canvas = np.pad(fitted, ((pad_y, pad_y + rem_y), (pad_x, pad_x + rem_x), (0, 0)))
    side = host["crop"][0]
    crops = [canvas[i : i + side, j : j + side] for i in range(0, target[0], side) for j in range(0, target[1], side)]
    edge = host["shortest_edge"]
    return [resize(image, edge, edge), *crops]


def llava_patches(image: np.ndarray, host: dict[str, Any]) -> list[np.ndarray]:
    """LLaVA: one normalised patch (padded to a square with the mean colour first with ``do_pad``)."""
    return [_clip_patch(_pad_to_square(image, host["mean"]) if host["do_pad"] else image, host)]


def anyres_patches(image: np.ndarray, host: dict[str, Any]) -> list[np.ndarray]:
    """LLaVA-NeXT: the normalised thumbnail and crops."""
    return [_clip_patch(p, host) for p in _anyres_patches(image, host)]


def unpad_band(size: tuple[int, int], current: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of a ``current = (H, W)`` feature grid that hold the image of original ``size`` rather
    than padding (``unpad_image``)."""
    (height, width), (current_h, current_w) = size, current
    if width / height > current_w / current_h:
        new_height = int(round(height * (current_w / width), 7))
        pad = (current_h - new_height) // 2
        return slice(pad, current_h - pad), slice(0, current_w)
    new_width = int(round(width * (current_h / height), 7))
    pad = (current_w - new_width) // 2
    return slice(0, current_h), slice(pad, current_w - pad)


def crop_tokens(host: dict[str, Any]) -> int:
    """Image tokens the vision graph gives per crop (one more than the patches with the 'full' strategy's CLS)."""
    return (host["image_size"] // host["patch_size"]) ** 2 + (0 if host["select_strategy"] == "default" else 1)


def crop_grid(size: tuple[int, int], host: dict[str, Any]) -> tuple[int, int]:
    """``(rows, columns)`` of LLaVA-NeXT crops for an image of original ``size``."""
    return tuple(r // host["image_size"] for r in select_best_resolution(size, host["grid_pinpoints"]))


def most_crops(host: dict[str, Any]) -> int:
    """Vision runs of LLaVA-NeXT's largest grid resolution: its crops + the thumbnail."""
    side = host["image_size"]
    return 1 + max(math.ceil(h / side) * math.ceil(w / side) for h, w in host["grid_pinpoints"])


def crop_layout(size: tuple[int, int], host: dict[str, Any], patches: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """The crops of a ``patches``-image AnyRes stack laid out on their grid: ``index [H, W]`` = which token of the
    vision output flattened to ``[patches * n]`` sits at each grid position, and the unpadded band of the grid."""
    side = host["image_size"] // host["patch_size"]
    rows, columns = crop_grid(size, host)
    tokens = np.arange(side * side, patches * side * side).reshape(rows, columns, side, side)
    index = tokens.transpose(0, 2, 1, 3).reshape(rows * side, columns * side)
    return index, unpad_band(size, index.shape)


def emit_rows(grid: np.ndarray, flat: np.ndarray, newline: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``grid`` (token indices into ``flat``, -1 for an empty position) row by row, each row followed by
    ``newline`` when given: ``(features [N, D], the token indices among them, in order)``."""
    sequence = grid.ravel() if newline is None else np.concatenate([grid, np.full((len(grid), 1), NEWLINE)], 1).ravel()
    sequence = sequence[sequence != -1]
    if newline is None:
        return flat[sequence], sequence
    tokens = sequence >= 0
    return np.where(tokens[:, None], flat[np.maximum(sequence, 0)], newline), sequence[tokens]


def pack_single(
    features: np.ndarray, size: tuple[int, int], host: dict[str, Any], newline: np.ndarray | None
) -> np.ndarray:
    """LLaVA: the vision graph's output ``[1, n, D]`` is the image's features."""
    return features.reshape(-1, features.shape[-1])


def pack_anyres(
    features: np.ndarray, size: tuple[int, int], host: dict[str, Any], newline: np.ndarray | None
) -> np.ndarray:
    """LLaVA-NeXT: vision-graph output ``[P, n, D]`` -> the image's token features ``[N, D]`` in prompt order."""
    flat = features.reshape(-1, features.shape[-1])
    if len(features) == 1:
        return np.concatenate([features[0], newline[None]]) if newline is not None else features[0]
    index, band = crop_layout(size, host, len(features))
    return np.concatenate([features[0], emit_rows(index[band], flat, newline)[0]])


def single_count(host: dict[str, Any], size: tuple[int, int] | None) -> tuple[int, int]:
    """LLaVA: ``(image-token positions, vision runs)``, whatever the size."""
    return crop_tokens(host), 1


def anyres_count(host: dict[str, Any], size: tuple[int, int] | None) -> tuple[int, int]:
    """LLaVA-NeXT: thumbnail + unpadded crop grid + a newline per row (default size: the vision input's square)."""
    size = size or (host["image_size"], host["image_size"])
    rows, columns = crop_grid(size, host)
    features = np.zeros((1 + rows * columns, crop_tokens(host), 1), np.float32)
    return len(pack_anyres(features, size, host, np.zeros(1, np.float32))), len(features)
