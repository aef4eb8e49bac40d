"""Zero-TPrune (Wang, Dedhia and Jha, CVPR 2024): training-free pruning by attention-graph importance and similarity.

Both faces read this dataclass: the eager reference (``tokensieve.reference.zerotprune``) and the graph face
(``tokensieve.graph_passes.sites.zerotprune``). Semantics (docs/methods.md#zero-tprune, with what was left out):

* where: after the attention residual and before the MLP of each block in ``layers`` (0-based), scored with that
  block's own post-softmax attention over all query rows (the attention graph);
* importance (I-stage): weighted PageRank per head, ``s <- Aᵀ s`` from the uniform start ``1/N``, ``iterations``
  times (default: the paper's per-depth schedule, 30 in the first three blocks, 1 in the last three, 5 between);
* heads: the variance-based head filter keeps the heads whose variance of ``N·s`` over the tokens lies in
  ``head_filter = [low, high]`` (all heads when none does; ``None``: no filter); the kept heads are combined by
  their root mean square (``eir=True``, the paper's "emphasizing informative region") or their mean;
* similarity (S-stage): the ``group = n // 2`` least important candidates form the less-important group; each is
  scored by its best cosine similarity (head-mean keys) to the other group, and the ``similar`` highest are pruned;
* selection (I-stage): of the remaining candidates the ``kept`` most important stay, in their original order;
  special tokens (CLS, registers, distillation token) are never pruned;
* counts: ``kept = ceil(keep·n)``; of the ``n - kept`` pruned candidates ``min(floor(similar·(n - kept)), group)``
  go by similarity, the rest by importance;
* threshold form (``threshold=t`` instead of ``keep``): keep the candidates with ``n·ŝ > t``, ``ŝ`` the importance
  renormalised over the candidates (1.0 = average); a data-dependent count (``adaptive``), exported as a staged
  artifact with buckets like ATP (``--calibrate DATA --target-keep R`` sets ``t``); no S-stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import (
    SiteCount,
    ceil_fraction,
    check_bool,
    check_depth,
    check_keep,
    check_layers,
    check_real,
)

EARLY_ITERATIONS, MIDDLE_ITERATIONS, LATE_ITERATIONS = 30, 5, 1  # the paper's schedule (low ends of its ranges)
DEFAULT_HEAD_FILTER = (0.01, 0.7)


def _similar(value: Any) -> Fraction:
    if isinstance(value, str):
        try:
            value = Fraction(value)
        except ValueError:
            raise MethodSpecError(f"zerotprune: similar must be a number in [0, 1], got {value!r}") from None
    if value == 0 and not isinstance(value, bool):
        return Fraction(0)
    return check_keep("zerotprune", value, "similar=0.5 prunes half of the tokens by similarity", "similar")


def _head_filter(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(isinstance(v, (int, float, Fraction)) and not isinstance(v, bool) for v in value)
    if not ok or not 0 <= value[0] <= value[1]:
        raise MethodSpecError(
            f"zerotprune: head_filter must be [low, high] with 0 <= low <= high (variance of N·s), or none; got "
            f"{value!r}, e.g. head_filter=[0.01, 0.7]"
        )
    return float(value[0]), float(value[1])


@dataclass(frozen=True)
class ZeroTPrune:
    """Keep ``ceil(keep·candidates)`` tokens after the attention of ``layers``, pruned by similarity and
    importance (weighted PageRank of the attention graph)."""

    keep: Fraction | None = None
    layers: tuple[int, ...] = (3, 6, 9)
    threshold: float | None = None
    iterations: int | None = None
    similar: Fraction = Fraction(1, 2)
    eir: bool = True
    head_filter: tuple[float, float] | None = DEFAULT_HEAD_FILTER
    name: ClassVar[str] = "zerotprune"
    merges: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.threshold is None):
            raise MethodSpecError(
                "zerotprune: give keep (a static count, e.g. keep=0.7) or threshold (a data-dependent count served "
                "with buckets, e.g. threshold=1.0), exactly one of them"
            )
        if self.keep is not None:
            object.__setattr__(self, "keep", check_keep("zerotprune", self.keep))
        threshold = check_real("zerotprune", "threshold", self.threshold)
        if threshold is not None and threshold < 0:
            raise MethodSpecError(f"zerotprune: threshold must be >= 0 (1.0 = average importance), got {threshold:g}")
        object.__setattr__(self, "threshold", threshold)
        layers = check_layers("zerotprune", self.layers)
        if layers is None:
            raise MethodSpecError("zerotprune: layers must list the blocks to prune after, e.g. layers=[3,6,9]")
        object.__setattr__(self, "layers", layers)
        it = self.iterations
        if it is not None and (isinstance(it, bool) or not isinstance(it, int) or not 1 <= it <= 100):
            raise MethodSpecError(
                f"zerotprune: iterations must be an int in 1..100 (power iterations of the attention graph) or none "
                f"for the paper's per-depth schedule, got {it!r}"
            )
        object.__setattr__(self, "similar", _similar(self.similar))
        check_bool("zerotprune", "eir", self.eir)
        object.__setattr__(self, "head_filter", _head_filter(self.head_filter))

    # -- counts (shared by the reference and the graph pass) -------------------------------------------------
    def iterations_at(self, layer: int, depth: int) -> int:
        """Power iterations at block ``layer`` of a ``depth``-block model."""
        if self.iterations is not None:
            return self.iterations
        if layer < 3:
            return EARLY_ITERATIONS
        return LATE_ITERATIONS if layer >= depth - 3 else MIDDLE_ITERATIONS

    @property
    def adaptive(self) -> bool:
        """The threshold form keeps a data-dependent number of tokens (a staged artifact with buckets)."""
        return self.threshold is not None

    def grid_positions(self, candidates: int) -> list[int]:
        """Candidates every image keeps whatever its scores (none: Zero-TPrune has no spatial grid)."""
        return []

    def with_threshold(self, threshold: float) -> ZeroTPrune:
        return replace(self, keep=None, threshold=threshold)

    def counts(self, candidates: int) -> dict[str, int]:
        """``kept``, ``similar`` (pruned by the S-stage) and ``group`` (the less-important group's size)."""
        kept = max(1, ceil_fraction(self.keep, candidates))
        group = candidates // 2
        pruned = candidates - kept
        similar = min(self.similar.numerator * pruned // self.similar.denominator, group)
        return {"kept": kept, "similar": similar, "group": group}

    def layers_for(self, depth: int) -> tuple[int, ...]:
        return self.layers

    def validate(self, tokens: int, specials: int, depth: int) -> None:
        check_depth("zerotprune", self.layers, depth)

    def site(self, layer: int, tokens_in: int, specials: int, depth: int) -> SiteCount:
        """The counts at ``layer``; for the threshold form the upper bound (every token kept)."""
        candidates = tokens_in - specials
        if candidates < 1:
            raise MethodSpecError(f"zerotprune: no candidate tokens left at layer {layer}")
        if self.adaptive:
            return SiteCount(layer, tokens_in, candidates, tokens_in, {"max": tokens_in})
        params = {**self.counts(candidates), "iterations": self.iterations_at(layer, depth)}
        return SiteCount(layer, tokens_in, candidates, specials + params["kept"], params)

    def to_dict(self) -> dict[str, Any]:
        count = {"keep": str(self.keep)} if self.keep is not None else {"threshold": self.threshold}
        return {
            "name": self.name,
            **count,
            "layers": list(self.layers),
            "iterations": self.iterations,
            "similar": str(self.similar),
            "eir": self.eir,
            "head_filter": list(self.head_filter) if self.head_filter is not None else None,
        }

    def describe(self) -> str:
        extra = f", iterations={self.iterations}" if self.iterations is not None else ""
        if self.similar != Fraction(1, 2):
            extra += f", similar={float(self.similar):g}"
        if not self.eir:
            extra += ", eir=false"
        if self.head_filter != DEFAULT_HEAD_FILTER:
            extra += f", head_filter={list(self.head_filter) if self.head_filter else None}"
        count = f"keep={float(self.keep):g}" if self.keep is not None else f"threshold={self.threshold:g}"
        return f"zerotprune({count}, layers={list(self.layers)}{extra})"
