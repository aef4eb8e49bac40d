"""PiToMe (spectrum-preserving token merging, Tran et al., NeurIPS 2024): energy-score merging.

Semantics (docs/methods.md#pitome; written from the paper and the description of the official code):

* metric: the block's attention keys averaged over heads, L2-normalised, special tokens excluded;
* energy of token i: ``mean_j ELU(cos(i, j) - margin_l, alpha)`` over the ``T`` candidates; high energy = member
  of a large cluster of similar tokens;
* ``r = floor(T - T * ratio)`` (``ratio`` = fraction kept per block, the official float expression), at most T/2;
* candidates sorted by energy, descending (ties: lower index first); the top ``2r`` are mergeable, the rest are
  protected. Mergeable tokens alternate in energy order: A = even ranks, B = odd ranks; every A token merges into
  its most similar B token (size-weighted mean). All ``r`` A tokens merge;
* output order: ``[specials, protected (energy order), B (energy order)]``;
* per-block margin: ``margin * (1 - l / depth)`` (default 0.9 - 0.9·l/L), or a list, one per owned block;
* proportional attention in later blocks (``prop_attn``).

``bsm_layers`` selects blocks that run the official code's BSM variant instead (at 550b5de its DeiT patch does so in
the first ``ceil(L/2)`` blocks, ``bsm_layers="first_half"``, its MAE patch in the others, ``"second_half"``): every
candidate takes part, A = even and B = odd ranks of the whole energy order, each A token's best B match scores it,
the ``r`` best-scoring A tokens merge (ToMe's bipartite soft matching on energy-ordered sets); output
``[specials, unmerged A (score order), B (energy order)]``. By default every owned block uses the PiToMe rule above,
as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import SiteCount, check_bool, check_depth, check_layers

_HALVES = ("first_half", "second_half")


def _number(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise MethodSpecError(f"{name}: {key} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class PiToMe:
    ratio: float
    margin: float | tuple[float, ...] = 0.9
    alpha: float = 1.0
    layers: tuple[int, ...] | None = None
    prop_attn: bool = True
    bsm_layers: tuple[int, ...] | str | None = None
    name: ClassVar[str] = "pitome"
    merges: ClassVar[bool] = True

    def __post_init__(self) -> None:
        ratio = _number("pitome", "ratio", self.ratio)
        if not 0 < ratio <= 1:
            raise MethodSpecError(f"pitome: ratio (fraction kept per block) must be in (0, 1], got {ratio:g}")
        object.__setattr__(self, "ratio", ratio)
        margin = self.margin
        if isinstance(margin, (list, tuple)):
            margin = tuple(_number("pitome", "margin", m) for m in margin)
            if not margin:
                raise MethodSpecError("pitome: margin list is empty")
        else:
            margin = _number("pitome", "margin", margin)
        object.__setattr__(self, "margin", margin)
        object.__setattr__(self, "alpha", _number("pitome", "alpha", self.alpha))
        object.__setattr__(self, "layers", check_layers("pitome", self.layers))
        check_bool("pitome", "prop_attn", self.prop_attn)
        if isinstance(self.bsm_layers, str):
            if self.bsm_layers not in _HALVES:
                raise MethodSpecError(
                    "pitome: bsm_layers must be a list of block indices, 'first_half' or 'second_half', got "
                    f"{self.bsm_layers!r}"
                )
        else:
            object.__setattr__(self, "bsm_layers", check_layers("pitome", self.bsm_layers))

    def uses_bsm(self, layer: int, depth: int) -> bool:
        """Whether block ``layer`` runs the BSM variant (halves split at ``ceil(depth / 2)``, as the official code)."""
        if isinstance(self.bsm_layers, str):
            return (layer < math.ceil(depth / 2)) == (self.bsm_layers == "first_half")
        return self.bsm_layers is not None and layer in self.bsm_layers

    def layers_for(self, depth: int) -> tuple[int, ...]:
        return self.layers if self.layers is not None else tuple(range(depth))

    def margin_for(self, layer: int, depth: int) -> float:
        if isinstance(self.margin, tuple):
            return self.margin[self.layers_for(depth).index(layer)]
        return self.margin - self.margin * (layer / depth)

    def validate(self, tokens: int, specials: int, depth: int) -> None:
        layers = self.layers_for(depth)
        check_depth("pitome", layers, depth)
        if isinstance(self.margin, tuple) and len(self.margin) != len(layers):
            raise MethodSpecError(
                f"pitome: {len(self.margin)} margins given for {len(layers)} blocks; give one per owned block"
            )
        if isinstance(self.bsm_layers, tuple) and not set(self.bsm_layers) <= set(layers):
            raise MethodSpecError(
                f"pitome: bsm_layers {sorted(set(self.bsm_layers) - set(layers))} are not blocks the method owns "
                f"({list(layers)})"
            )

    def site(self, layer: int, tokens_in: int, specials: int, depth: int) -> SiteCount | None:
        candidates = tokens_in - specials
        r = min(math.floor(candidates - candidates * self.ratio), candidates // 2)
        if r <= 0:
            return None
        params = {"r": r, "bsm": 1} if self.uses_bsm(layer, depth) else {"r": r}
        return SiteCount(layer, tokens_in, candidates, tokens_in - r, params)

    def to_dict(self) -> dict[str, Any]:
        margin = list(self.margin) if isinstance(self.margin, tuple) else self.margin
        return {
            "name": self.name,
            "ratio": self.ratio,
            "margin": margin,
            "alpha": self.alpha,
            "layers": None if self.layers is None else list(self.layers),
            "prop_attn": self.prop_attn,
            "bsm_layers": list(self.bsm_layers) if isinstance(self.bsm_layers, tuple) else self.bsm_layers,
        }

    def describe(self) -> str:
        parts = [f"ratio={self.ratio:g}"]
        if self.margin != 0.9:
            parts.append(f"margin={list(self.margin) if isinstance(self.margin, tuple) else self.margin}")
        if self.alpha != 1.0:
            parts.append(f"alpha={self.alpha:g}")
        if self.layers is not None:
            parts.append(f"layers={list(self.layers)}")
        if not self.prop_attn:
            parts.append("prop_attn=false")
        if isinstance(self.bsm_layers, str):
            parts.append(f"bsm_layers='{self.bsm_layers}'")
        elif self.bsm_layers is not None:
            parts.append(f"bsm_layers={list(self.bsm_layers)}")
        return f"pitome({', '.join(parts)})"
