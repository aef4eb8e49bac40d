"""Bucket edges from observed token counts: an exact dynamic-programming partition that minimises expected compute.

Given the counts observed on calibration data and a cost per bucket size (the MACs of the stage graph that runs
after the decision, a quadratic polynomial in the number of tokens: linear layers grow with K, attention with K²),
choose at most ``max_buckets`` sizes so that sending every image to the smallest bucket that holds its count
costs the least on average. The optimal sizes are always observed counts (a larger bucket costs more and holds
nothing new), so the DP runs over the distinct counts: ``best[j][i]`` = least cost of covering the ``i`` smallest
distinct counts with ``j`` buckets, the largest of them being count ``i``; O(m² · B).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class BucketPlan:
    sizes: list[int]
    expected_cost: float  # mean cost per image with these buckets
    oracle_cost: float  # mean cost per image at its exact count
    padmax_cost: float  # mean cost per image padded to the largest count
    expected_waste: float  # expected_cost / oracle_cost - 1
    padding_tokens: float  # mean (bucket - count) per image
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def quadratic_cost(points: Sequence[tuple[int, float]]) -> Callable[[int], float]:
    """The exact quadratic ``c0 + c1·K + c2·K²`` through three (K, cost) points (least squares with more)."""
    k = np.array([p[0] for p in points], dtype=np.float64)
    c = np.array([p[1] for p in points], dtype=np.float64)
    coefficients = np.polyfit(k, c, deg=2)
    return lambda size: float(np.polyval(coefficients, size))


def choose_buckets(counts: Sequence[int], max_buckets: int, cost: Callable[[int], float]) -> BucketPlan:
    if max_buckets < 1:
        raise ValueError("max_buckets must be >= 1")
    values, freq = np.unique(np.asarray(counts, dtype=np.int64), return_counts=True)
    m, total = len(values), int(freq.sum())
    prefix = np.concatenate([[0], np.cumsum(freq)])
    costs = np.array([cost(int(v)) for v in values])
    buckets = min(max_buckets, m)
    best = np.full((buckets + 1, m), np.inf)
    back = np.full((buckets + 1, m), -1, dtype=np.int64)
    best[1] = costs * prefix[1:]
    for j in range(2, buckets + 1):
        for i in range(j - 1, m):
            options = best[j - 1, j - 2 : i] + costs[i] * (prefix[i + 1] - prefix[j - 1 : i + 1])
            k = int(np.argmin(options))
            best[j, i], back[j, i] = options[k], k + j - 2
    j = int(np.argmin(best[1:, m - 1])) + 1
    sizes, i = [], m - 1
    while i >= 0 and j >= 1:
        sizes.append(int(values[i]))
        i, j = int(back[j, i]), j - 1
    sizes.reverse()
    assigned = np.array([next(s for s in sizes if s >= v) for v in values])
    oracle = float((costs * freq).sum() / total)
    expected = float(best[len(sizes), m - 1] / total)
    return BucketPlan(
        sizes=sizes,
        expected_cost=expected,
        oracle_cost=oracle,
        padmax_cost=float(cost(int(values[-1]))),
        expected_waste=expected / oracle - 1.0,
        padding_tokens=float(((assigned - values) * freq).sum() / total),
        samples=total,
    )
