"""ToMe (Token Merging, Bolya et al., ICLR 2023): bipartite soft matching between attention and MLP.

Semantics (docs/methods.md#tome; written from the paper and the behaviour of the official code, none of which is used):

* metric: the block's attention keys averaged over heads, L2-normalised per token (cosine similarity);
* split: alternate tokens of the current sequence, A = even positions, B = odd positions;
* special tokens (CLS, distillation, **and register tokens**, which the official patch merges by mistake) are
  protected: never a source, never a destination, and kept at the front of the sequence;
* each non-protected A token finds its most similar B token; the ``r`` A tokens with the highest best-similarity
  are merged into their B partners (size-weighted mean), the others stay;
* output order: ``[specials, unmerged A (ascending position if the model has a special token, otherwise
  similarity order, like the official code), all B]``; for a model with only a CLS token, or CLS + distillation
  token, this is exactly the official order;
* ``r`` is clamped per block like the official code: ``min(r, (N - specials) // 2)``;
* proportional attention: every later block adds ``log(size)`` to its attention logits (``prop_attn``).

Schedules: ``r`` an int (every owned block), a list (per owned block, zero-padded), or an int with
``inflection`` in [-1, 1] (ToMe's ``(r, inflection)``: linear from ``int(r·(1 - inflection))`` to ``2r - that``;
``inflection=-1`` is the paper's decreasing schedule). The float arithmetic of that schedule is ToMe's own, so
counts match it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import SiteCount, check_bool, check_depth, check_layers


@dataclass(frozen=True)
class ToMe:
    r: int | tuple[int, ...]
    inflection: float | None = None
    layers: tuple[int, ...] | None = None
    prop_attn: bool = True
    name: ClassVar[str] = "tome"
    merges: ClassVar[bool] = True

    def __post_init__(self) -> None:
        r = self.r
        if isinstance(r, list):
            r = tuple(r)
        if isinstance(r, tuple):
            if not r or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
                raise MethodSpecError(f"tome: r must be a non-negative int or a list of them, got {self.r!r}")
            if self.inflection is not None:
                raise MethodSpecError("tome: inflection applies to an int r, not to a per-layer list")
        elif isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise MethodSpecError(f"tome: r must be a non-negative int or a list of them, got {self.r!r}")
        object.__setattr__(self, "r", r)
        if self.inflection is not None:
            inflection = float(self.inflection)
            if not -1 <= inflection <= 1:
                raise MethodSpecError(f"tome: inflection must be in [-1, 1], got {inflection:g}")
            object.__setattr__(self, "inflection", inflection)
        object.__setattr__(self, "layers", check_layers("tome", self.layers))
        check_bool("tome", "prop_attn", self.prop_attn)

    def layers_for(self, depth: int) -> tuple[int, ...]:
        return self.layers if self.layers is not None else tuple(range(depth))

    def r_schedule(self, depth: int) -> dict[int, int]:
        """Requested r per owned block (before clamping), following ToMe's ``parse_r``."""
        layers = self.layers_for(depth)
        if isinstance(self.r, tuple):
            values = list(self.r) + [0] * (len(layers) - len(self.r))
        else:
            inflection = self.inflection or 0.0
            low = int(self.r * (1.0 - inflection))
            high = 2 * self.r - low
            step = (high - low) / (len(layers) - 1) if len(layers) > 1 else 0.0
            values = [int(low + step * i) for i in range(len(layers))]
        return dict(zip(layers, values, strict=False))

    def validate(self, tokens: int, specials: int, depth: int) -> None:
        layers = self.layers_for(depth)
        check_depth("tome", layers, depth)
        if isinstance(self.r, tuple) and len(self.r) > len(layers):
            raise MethodSpecError(
                f"tome: the r schedule has {len(self.r)} entries but the method owns {len(layers)} blocks"
            )
        largest = max(self.r_schedule(depth).values(), default=0)
        if largest > (tokens - specials) // 2:
            raise MethodSpecError(
                f"tome: r={largest} is larger than the tokens allow: at most {(tokens - specials) // 2} of the "
                f"{tokens - specials} mergeable tokens can merge in one block"
            )

    def site(self, layer: int, tokens_in: int, specials: int, depth: int) -> SiteCount | None:
        r = min(self.r_schedule(depth).get(layer, 0), (tokens_in - specials) // 2)
        if r <= 0:
            return None
        return SiteCount(layer, tokens_in, tokens_in - specials, tokens_in - r, {"r": r})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "r": list(self.r) if isinstance(self.r, tuple) else self.r,
            "inflection": self.inflection,
            "layers": None if self.layers is None else list(self.layers),
            "prop_attn": self.prop_attn,
        }

    def describe(self) -> str:
        r = list(self.r) if isinstance(self.r, tuple) else self.r
        parts = [f"r={r}"]
        if self.inflection is not None:
            parts.append(f"inflection={self.inflection:g}")
        if self.layers is not None:
            parts.append(f"layers={list(self.layers)}")
        if not self.prop_attn:
            parts.append("prop_attn=false")
        return f"tome({', '.join(parts)})"
