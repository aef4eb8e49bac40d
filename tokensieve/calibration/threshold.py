"""Calibrate ATP's absolute threshold so that a target fraction of the candidates is kept on average.

The keep rule ``n·s_i > threshold`` (united with the grid) is monotone in the threshold, so a bisection on the
scores observed on the calibration data finds the threshold whose mean keep fraction is closest to the target.
"""

from __future__ import annotations

import numpy as np

from tokensieve.errors import MethodSpecError


def keep_fraction(scores: np.ndarray, grid: np.ndarray, threshold: float) -> float:
    """Mean fraction kept by ``n·s > threshold`` ∪ grid over images ``scores [M, n]`` (rows sum to 1)."""
    n = scores.shape[1]
    return float(((n * scores > threshold) | grid[None, :]).mean())


def calibrate_threshold(scores: np.ndarray, grid: np.ndarray, target: float, iterations: int = 60) -> float:
    if not 0 < target <= 1:
        raise MethodSpecError(f"target keep fraction must be in (0, 1], got {target:g}")
    floor = keep_fraction(scores, grid, float(scores.shape[1]) + 1.0)  # the grid alone
    if target < floor:
        raise MethodSpecError(
            f"target keep {target:g} is below what the spatial grid alone keeps ({floor:.3f}); lower grid= or raise "
            "the target"
        )
    low, high = 0.0, float(scores.shape[1] * scores.max())
    for _ in range(iterations):
        middle = (low + high) / 2
        if keep_fraction(scores, grid, middle) > target:
            low = middle
        else:
            high = middle
    return high
