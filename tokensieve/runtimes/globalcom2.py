"""GlobalCom²'s selection on the host, in numpy: what replaces LLaVA-NeXT's ``pack_features`` for an artifact
exported with ``globalcom2`` (semantics in :mod:`tokensieve.methods.globalcom2`).

The vision graph returns ``image_features [P, n, D]`` and ``cls_scores [P, n]`` (index 0 = thumbnail). The crop grid,
the unpadding band and the interpolation size depend only on the image size, which the host knows, so the selection
runs here, next to the AnyRes packing, with static-shape graphs on either side. The kept features are returned with
their indices into the vision graph's flattened ``[P * n]`` tokens, in prompt order (what parity compares).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tokensieve.methods.faces import register
from tokensieve.methods.globalcom2 import GlobalCom2
from tokensieve.runtimes.llava_image import crop_grid, crop_layout, emit_rows
from tokensieve.runtimes.ort import OrtRunner


def bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-D ``grid`` to ``(height, width)``: bilinear, half-pixel centres, edges clamped (``align_corners``
    false, as ``torch.nn.functional.interpolate``); an empty target (an image so thin that unpadding leaves no crop
    row or column) is an empty grid."""
    if height == 0 or width == 0:
        return np.zeros((height, width), grid.dtype)

    def taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # float32 source coordinates, as torch computes them for float32 input (values agree to float32 rounding)
        where = np.maximum(np.float32(source / target) * (np.arange(target, dtype=np.float32) + 0.5) - 0.5, 0)
        low = np.floor(where).astype(np.int64)
        return low, np.minimum(low + 1, source - 1), (where - low).astype(grid.dtype)

    (r0, r1, dr), (c0, c1, dc) = taps(grid.shape[0], height), taps(grid.shape[1], width)
    columns = grid[:, c0] * (1 - dc) + grid[:, c1] * dc
    return (1 - dr)[:, None] * columns[r0] + dr[:, None] * columns[r1]


def crop_scales(thumbnail: np.ndarray, grid: tuple[int, int], method: GlobalCom2) -> np.ndarray:
    """Each crop's keep fraction from the thumbnail scores ``[side * side]`` summed over the crop's cell."""
    rows, columns = grid
    side = math.isqrt(len(thumbnail))
    i, j = np.divmod(np.arange(len(thumbnail)), side)
    cell = np.minimum(i // max(side // rows, 1), rows - 1) * columns + np.minimum(
        j // max(side // columns, 1), columns - 1
    )
    sums = np.bincount(cell, weights=thumbnail.astype(np.float64), minlength=rows * columns)
    weights = np.exp((sums - sums.max()) / float(method.temperature))
    weights = weights / (weights.sum() + 1e-8)
    return np.minimum(float(method.retention) * (1 + weights - weights.mean()), 1.0)


def _unit(values: np.ndarray) -> np.ndarray:
    return values / max(float(np.sqrt((values * values).sum())), 1e-12)


def select_features(
    features: np.ndarray,
    scores: np.ndarray,
    size: tuple[int, int],
    host: dict[str, Any],
    newline: np.ndarray,
    method: GlobalCom2,
) -> tuple[np.ndarray, np.ndarray]:
    """``(packed [N, D], kept)``: the image's features in prompt order and, for each one except the newlines, its
    index into ``features`` flattened to ``[P * n]``."""
    count, tokens, dim = features.shape
    thumbnail = np.argsort(-scores[0], kind="stable")[: method.thumbnail_count(tokens)]
    side = host["image_size"] // host["patch_size"]
    index, band = crop_layout(size, host, count)
    crop_scores = scores.ravel()[index]
    guide = np.zeros(index.shape, np.float32)
    guide[band] = bilinear(scores[0].reshape(side, side), *guide[band].shape)
    valid = np.zeros(index.shape, bool)
    valid[band] = True
    grid = crop_grid(size, host)
    placed = np.full(index.shape, -1)  # the vision token at each grid position of the output, -1 for none
    for crop, scale in enumerate(crop_scales(scores[0], grid, method)):
        top, left = divmod(crop, grid[1])
        top, left = top * side, left * side
        block = np.s_[top : top + side, left : left + side]
        local = np.flatnonzero(valid[block])  # the crop's valid tokens, raster order
        budget = int(len(local) * scale)
        if budget:
            combined = _unit(crop_scores[block].ravel()[local]) + _unit(guide[block].ravel()[local])
            ranks = np.sort(np.argsort(-combined, kind="stable")[:budget])
            source = local[ranks]
            target = source if method.layout == "grid" else ranks  # official: the rank in the valid list
            placed[top + target // side, left + target % side] = index[top + source // side, left + source % side]
    emitted = placed[band[0]] if method.layout == "grid" else placed  # official: every row of the padded grid
    crop_part, kept = emit_rows(emitted, features.reshape(-1, dim), newline)
    return np.concatenate([features[0][thumbnail], crop_part]), np.concatenate([thumbnail, kept])


@register("image_tokens", GlobalCom2)
def image_tokens(
    vision: list[OrtRunner],
    pixel_values: np.ndarray,
    size: tuple[int, int],
    host: dict[str, Any],
    newline: np.ndarray,
    method: GlobalCom2,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The ``"image_tokens"`` face: the vision graph, then :func:`select_features` from its ``cls_scores``."""
    out = vision[0].run({"pixel_values": pixel_values})
    packed, kept = select_features(out["image_features"], out["cls_scores"], size, host, newline, method)
    return packed, {"kept_features": kept}
