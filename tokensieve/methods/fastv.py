"""FastV visual-token dropping in an MLLM decoder (ECCV 2024): the method's single declaration.

Both faces read this dataclass: the eager reference (``tokensieve.reference.fastv``) and the graph passes
(``tokensieve.graph_passes.fastv`` on the prefill graph, ``tokensieve.graph_passes.split_cache_slot`` on the
fixed-capacity decode graph). Semantics (docs/methods.md#fastv, official "inplace" variant):

* where: prefill, before decoder layer ``k`` (0-based); layers ``< k`` see and cache every token, layers ``>= k``
  only the kept ones, for the whole generation;
* score: post-softmax attention of layer ``k - 1``, averaged over heads, of the **last prompt position** (query
  row), over the image columns;
* selection: the top ``R = ceil(keep * image_tokens)`` image tokens (ties: lower index first, like ONNX TopK) plus
  every non-image token, in ascending original order;
* positions: kept tokens keep their original position ids; decoding continues at absolute positions, so layers
  ``>= k`` write their cache slot ``position - dropped`` with ``dropped = image_tokens - R``.

``R`` uses the exact value of ``keep`` (``keep=0.5`` is 1/2), at least 1 when the image has tokens. FastV's HF port
rounds ``image_tokens * (1 - r)``; for the paper's settings (576 tokens, R = 50 % / 75 %) both give the same count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import ceil_fraction, check_keep
from tokensieve.methods.decoder import DecoderContext, DecoderMethod, PlanCost, PlanInput


@dataclass(frozen=True)
class FastV(DecoderMethod):
    """Drop the image tokens the last prompt token attends to least, before decoder layer ``k``."""

    k: int = 2
    keep: Fraction = Fraction(1, 2)
    several_images: ClassVar[bool] = True  # reads the image tokens as a set of positions
    name: ClassVar[str] = "fastv"
    data_dependent: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise MethodSpecError(
                f"fastv: k must be a decoder layer index >= 1 (layer k-1 gives the score), got {self.k!r}"
            )
        object.__setattr__(self, "keep", check_keep("fastv", self.keep, "keep=0.5 keeps half the image tokens"))

    @property
    def cuts(self) -> tuple[int, ...]:
        """The decoder layers the prefill is cut before."""
        return (self.k,)

    @property
    def cache_cuts(self) -> tuple[int, ...]:
        """The decoder layers the decode graphs split their cache slot at."""
        return self.cuts

    def kept_count(self, image_tokens: int) -> int:
        """``ceil(keep * image_tokens)`` in exact integer arithmetic (0 for a prompt without an image)."""
        if image_tokens <= 0:
            return 0
        return max(1, ceil_fraction(self.keep, image_tokens))

    def check_range(self, layers: int) -> None:
        if self.k >= layers:
            raise MethodSpecError(
                f"fastv: k={self.k} is out of range; this decoder has {layers} layers, so k must be in 1..{layers - 1}"
            )

    def validate(self, ctx: DecoderContext) -> None:
        self.check_range(ctx.layers)

    def dynamic(self, graphs: Iterable[str]) -> dict[str, str]:
        return {"prefill": "sequence and image_tokens (FastV: the kept length is an expression of both)"}

    def plan(self, p: PlanInput) -> PlanCost:
        self.check_range(p.layers)
        kept = p.length - p.image_tokens + self.kept_count(p.image_tokens)
        tokens = [p.length] * self.k + [kept] * (p.layers - self.k)
        scoring = p.length * p.heads * p.head_dim  # layer k-1's last-position attention row
        return PlanCost(tokens, [t + p.new_tokens for t in tokens], p.length + p.new_tokens, scoring)

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        image = image_tokens
        kept = f"{self.kept_count(image['count'])} of {image['count']}" if "count" in image else "ceil(keep * N) of N"
        return (
            f"layers {self.k}..{decoder['layers'] - 1} keep {kept} image tokens (the most attended by the "
            f"last prompt token in layer {self.k - 1}) and every text token, at their original positions"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "keep": str(self.keep)}

    def describe(self) -> str:
        return f"fastv(k={self.k}, keep={float(self.keep):g})"
