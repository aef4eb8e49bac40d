"""Antialiased bicubic resizing of 8-bit images in numpy, bit-exact with what torch computes on the CPU for a uint8
tensor (``torch.nn.functional.interpolate(..., mode="bicubic", antialias=True)``, which torchvision's
``resize`` and so the torchvision-backed Hugging Face image processors call).

The resize is separable and runs in fixed point, like Pillow's: for each output pixel along an axis, a cubic
filter (Keys, ``a = -0.5``) stretched by the downscaling factor gives float64 weights over the input pixels in its
support, normalised to sum 1; the weights are then scaled to 16-bit integers with the largest precision that keeps
the largest weight below ``2**15``; each output is ``(sum(weight * pixel) + 2**(p-1)) >> p`` clipped to
``[0, 255]``. The width is resized first, then the height, each pass rounding to 8 bits; an axis whose size does
not change is not touched.
"""

from __future__ import annotations

import math

import numpy as np

_A = -0.5  # Keys' cubic convolution parameter (Pillow's choice, which torch's antialiased kernel follows)
_TAPS = 4  # the cubic filter's support is 2 input pixels either side at scale 1


def _cubic(x: float) -> float:
    x = abs(x)
    if x < 1.0:
        return ((_A + 2) * x - (_A + 3)) * x * x + 1
    if x < 2.0:
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return 0.0


def _float_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """``(first input index [out], weights [out, taps])`` of one axis, float64, each row summing to 1."""
    scale = size_in / size_out
    support = _TAPS * 0.5 * scale if scale >= 1.0 else _TAPS * 0.5
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    first = np.zeros(size_out, np.int64)
    weights = np.zeros((size_out, taps))
    for i in range(size_out):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), size_in) - start
        row = [_cubic((j + start - center + 0.5) * inverse) for j in range(count)]
        total = sum(row)
        weights[i, :count] = [w / total for w in row] if total != 0.0 else row
        first[i] = start
    return first, weights


def _int_weights(weights: np.ndarray) -> tuple[np.ndarray, int]:
    """The weights in fixed point and their precision (bits after the point)."""
    largest = float(weights.max())
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < 1 << 15:
        precision += 1
    scaled = weights * (1 << precision)
    return np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32), precision


def _resize_axis(image: np.ndarray, size_out: int, axis: int) -> np.ndarray:
    """``image`` (uint8, any layout) resized along ``axis`` to ``size_out``."""
    size_in = image.shape[axis]
    first, weights = _float_weights(size_in, size_out)
    fixed, precision = _int_weights(weights)
    moved = np.moveaxis(image, axis, 0).astype(np.int32)  # 32-bit sums, as the vectorised kernel's
    total = np.full((size_out, *moved.shape[1:]), 1 << (precision - 1), np.int32)
    extra = (1,) * (moved.ndim - 1)
    for k in range(fixed.shape[1]):
        index = np.minimum(first + k, size_in - 1)  # taps past the support have weight 0
        total += moved[index] * fixed[:, k].reshape(-1, *extra)
    out = np.clip(total >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 ``[H, W, C]`` image resized to ``height x width`` (see the module docstring)."""
    if image.shape[1] != width:
        image = _resize_axis(image, width, 1)
    if image.shape[0] != height:
        image = _resize_axis(image, height, 0)
    return image
