"""Checks on a caller's pixel batch before any graph runs: one typed error naming what is wrong, rather than an
ONNX Runtime shape or dtype message, and no silent NaN (a NaN pixel changes an adaptive method's token count and
so the bucket an image is routed to)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tokensieve.errors import InputError


def check_pixels(pixels, shape: Sequence[int | None] | None = None, static_batch: int | None = None) -> np.ndarray:
    """``pixels`` if it is a finite float32 ``[N, C, H, W]`` batch (``shape`` = the model's ``[C, H, W]``, None for
    a symbolic axis) with ``N >= 1`` (``static_batch``: exactly that many)."""
    expected = "[N, " + ", ".join("?" if d is None else str(d) for d in (shape or ["C", "H", "W"])) + "]"
    if not isinstance(pixels, np.ndarray):
        raise InputError(f"pixel_values must be a numpy float32 array {expected}, got {type(pixels).__name__}")
    if pixels.dtype != np.float32:
        raise InputError(f"pixel_values must be float32 (normalised as the manifest says), got {pixels.dtype}")
    fits = shape is None or all(d is None or d == g for d, g in zip(shape, pixels.shape[1:], strict=False))
    if pixels.ndim != 4 or not fits:
        raise InputError(f"pixel_values must be {expected}, got {list(pixels.shape)}")
    if len(pixels) == 0:
        raise InputError("pixel_values holds no image (batch 0)")
    if static_batch and len(pixels) != static_batch:
        raise InputError(
            f"this artifact has a static batch of {static_batch}, got {len(pixels)} images; export with "
            "--dynamic-batch for other batch sizes"
        )
    if not np.isfinite(pixels).all():
        raise InputError("pixel_values hold NaN or infinite values")
    return pixels
