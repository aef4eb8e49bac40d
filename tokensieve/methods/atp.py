"""ATP-style adaptive token pruning on ViTs: a per-image number of tokens, served with static-shape buckets.

A ViT adaptation of ATP-LLaVA (docs/methods.md#atp-llava; training-free: the learned threshold heads are replaced by a
calibrated threshold). At each decision site (after the attention of a block, before its MLP):

* score: post-softmax CLS-row attention over the candidates, head mean, renormalised to sum to 1 over the
  candidates (``n·s_i = 1`` is "average"); on a model without a leading special token (SigLIP, I-JEPA, AIMv2,
  average-pooled ViTs) the attention each candidate receives, averaged over every query row and head, renormalised
  the same way (``score="auto"`` picks it from the located layout; the export records the choice);
* keep: ``n·s_i > threshold`` (absolute mode) or the smallest set of highest-scoring candidates whose scores sum to
  at least ``mass`` (cumulative mode; ties: lower index first) -- united with ATP's spatial grid (SAP) at the first
  site: every ``stride``-th row and column of the patch grid, ``stride = round(sqrt(1 / grid))``, so coverage of
  the image survives;
* the kept tokens stay in their original order after the special tokens. Their number is data-dependent.

Defaults (``atp()``): one site after block 3 (0-based), ``mass=0.9``, ``grid=0.25`` (a 2-stride grid, a quarter of
the patches). ``threshold`` overrides ``mass``; ``tokensieve export --calibrate DATA --target-keep R`` sets the
threshold that keeps a fraction R of the candidates on average.

Graph form (docs/methods.md#static-shapes): stage 1 (the decision) outputs the stream, a priority key (kept first) and
the count; the tail (stage 2) is specialised per bucket size ``K`` (static ``TopK``), and the slots beyond the
count are masked out of every later attention with an additive key bias, so valid tokens equal exact dropping.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import (
    Score,
    SiteCount,
    check_depth,
    check_layers,
    check_score,
    resolve_score,
    spatial_grid,
)


def _number(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise MethodSpecError(f"atp: {key} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ATPPrune:
    layers: tuple[int, ...] = (3,)
    threshold: float | None = None
    mass: float | None = None
    grid: float = 0.25
    score: Score = "auto"
    name: ClassVar[str] = "atp"
    merges: ClassVar[bool] = False
    adaptive: ClassVar[bool] = True

    def __post_init__(self) -> None:
        layers = check_layers("atp", self.layers)
        if layers is None:
            raise MethodSpecError("atp: layers must list the decision blocks, e.g. layers=[3]")
        object.__setattr__(self, "layers", layers)
        threshold, mass = _number("threshold", self.threshold), _number("mass", self.mass)
        if threshold is not None and mass is not None:
            raise MethodSpecError("atp: give threshold (absolute) or mass (cumulative), not both")
        if threshold is None and mass is None:
            mass = 0.9
        if threshold is not None and threshold < 0:
            raise MethodSpecError(f"atp: threshold must be >= 0 (1.0 = average score), got {threshold:g}")
        if mass is not None and not 0 < mass <= 1:
            raise MethodSpecError(f"atp: mass must be in (0, 1], got {mass:g}")
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "mass", mass)
        grid = _number("grid", self.grid)
        if not 0 <= grid <= 1:
            raise MethodSpecError(f"atp: grid (fraction of patches always kept) must be in [0, 1], got {grid:g}")
        object.__setattr__(self, "grid", grid)
        check_score("atp", self.score)

    def layers_for(self, depth: int) -> tuple[int, ...]:
        return self.layers

    def validate(self, tokens: int, specials: int, depth: int) -> None:
        check_depth("atp", self.layers, depth)
        self.resolved_score(specials)
        if self.grid:
            self.grid_positions(tokens - specials)

    def resolved_score(self, specials: int) -> str:
        return resolve_score("atp", self.score, specials)

    def for_layout(self, specials: int) -> ATPPrune:
        """The method with ``score="auto"`` resolved for a model with ``specials`` leading special tokens (what the
        manifest records)."""
        return replace(self, score=self.resolved_score(specials))

    def site(self, layer: int, tokens_in: int, specials: int, depth: int) -> SiteCount:
        """The upper bound (every token kept); the real count is data-dependent."""
        return SiteCount(layer, tokens_in, tokens_in - specials, tokens_in, {"max": tokens_in})

    def grid_positions(self, candidates: int) -> list[int]:
        """Candidate indices of the spatial grid (SAP) on a square patch grid of ``candidates`` tokens."""
        return spatial_grid("atp", self.grid, candidates, "patch candidates")

    def with_threshold(self, threshold: float) -> ATPPrune:
        return replace(self, threshold=threshold, mass=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": list(self.layers),
            "threshold": self.threshold,
            "mass": self.mass,
            "grid": self.grid,
            "score": self.score,
        }

    def describe(self) -> str:
        rule = f"threshold={self.threshold:g}" if self.threshold is not None else f"mass={self.mass:g}"
        score = f", score={self.score!r}" if self.score != "auto" else ""
        return f"atp(layers={list(self.layers)}, {rule}, grid={self.grid:g}{score})"
