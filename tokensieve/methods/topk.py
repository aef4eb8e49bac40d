"""EViT-style attention-score top-k token pruning: the method's single declaration.

Both faces of the method read this dataclass: the eager reference (``tokensieve.reference.topk``) and the graph
face (``tokensieve.graph_passes.sites.topk``). Counts are computed here, once, with exact rational arithmetic.

Semantics (docs/methods.md#top-k, with the differences stated):

* where: after the attention residual and before the MLP of each block in ``layers`` (0-based);
* score: ``"cls"`` = post-softmax attention of the CLS query row, averaged over heads, over the candidate
  (non-special) columns; ``"mean_received"`` = post-softmax attention each token receives, averaged over heads and
  over all query rows (for models without a CLS token, e.g. SigLIP); ``"auto"`` picks ``cls`` when the model has a
  leading special token and ``mean_received`` otherwise;
* selection: special tokens (CLS, registers, distillation token) are always kept; of the ``n`` candidates the top
  ``K = ceil(keep * n)`` by score are kept (ties: lower index first, like ONNX TopK), **in their original order**
  (EViT orders them by score; positional order is what later spatial consumers and humans expect);
* ``fuse="sum"`` appends EViT's fused token ``sum_j a_j x_j`` over the pruned candidates (official, unnormalised);
  ``fuse="mean"`` divides by ``sum_j a_j`` (the paper's "weighted average" wording). The fused token is a candidate
  at later sites like any patch token.

``K`` uses the exact value of ``keep`` (``keep=0.7`` is 7/10), so ``keep * n`` that is an integer gives exactly that
integer; EViT's float ``math.ceil(0.7 * 10)`` gives 8 where tokensieve gives 7.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, Literal

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import (
    Score,
    SiteCount,
    ceil_fraction,
    check_depth,
    check_keep,
    check_layers,
    check_score,
    resolve_score,
)

Fuse = Literal["sum", "mean"] | None


@dataclass(frozen=True)
class TopKPrune:
    """Keep the top ``ceil(keep * candidates)`` tokens by attention score after the attention of ``layers``."""

    keep: Fraction
    layers: tuple[int, ...] = (3, 6, 9)
    fuse: Fuse = None
    score: Score = "auto"
    name: ClassVar[str] = "topk"
    merges: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", check_keep("topk", self.keep))
        layers = check_layers("topk", self.layers)
        if layers is None:
            raise MethodSpecError("topk: layers must list the blocks to prune after, e.g. layers=[3,6,9]")
        object.__setattr__(self, "layers", layers)
        fuse = self.fuse
        if fuse is True:
            fuse = "sum"
        elif fuse is False:
            fuse = None
        if fuse not in (None, "sum", "mean"):
            raise MethodSpecError(f"topk: fuse must be false, true/'sum' (EViT) or 'mean', got {self.fuse!r}")
        object.__setattr__(self, "fuse", fuse)
        check_score("topk", self.score)

    # -- counts (shared by the reference and the graph pass) -------------------------------------------------
    def kept_count(self, candidates: int) -> int:
        """``ceil(keep * candidates)`` in exact integer arithmetic, at least 1."""
        return max(1, ceil_fraction(self.keep, candidates))

    def resolved_score(self, specials: int) -> Literal["cls", "mean_received"]:
        return resolve_score("topk", self.score, specials)

    def fused_token(self, kept: int, candidates: int) -> bool:
        """Whether a fused token is appended at a site (only when something was pruned)."""
        return bool(self.fuse) and kept < candidates

    def layers_for(self, depth: int) -> tuple[int, ...]:
        return self.layers

    def validate(self, tokens: int, specials: int, depth: int) -> None:
        check_depth("topk", self.layers, depth)
        self.resolved_score(specials)

    def site(self, layer: int, tokens_in: int, specials: int, depth: int) -> SiteCount:
        candidates = tokens_in - specials
        if candidates < 1:
            raise MethodSpecError(f"topk: no candidate tokens left at layer {layer}")
        kept = self.kept_count(candidates)
        out = specials + kept + int(self.fused_token(kept, candidates))
        return SiteCount(layer, tokens_in, candidates, out, {"kept": kept})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "keep": str(self.keep),
            "layers": list(self.layers),
            "fuse": self.fuse,
            "score": self.score,
        }

    def describe(self) -> str:
        fuse = f", fuse={self.fuse!r}" if self.fuse else ""
        score = f", score={self.score!r}" if self.score != "auto" else ""
        return f"topk(keep={float(self.keep):g}, layers={list(self.layers)}{fuse}{score})"
