"""ATP-LLaVA adaptive visual-token pruning in an MLLM decoder (CVPR 2025): the method's single declaration.

Training-free form of docs/methods.md#atp-llava (no official code; the paper's threshold heads are learned, so it
replaces them by a rule on the scores, the approximation docs/methods.md names). Both faces read this dataclass: the
eager reference (``tokensieve.reference.atp_llava``) and the deployed face (the prefill graph cut before each layer
of ``layers`` into ``prefill_0 .. prefill_n`` with the scores as outputs, :mod:`tokensieve.graph_passes.atp_scores`
and :mod:`tokensieve.graph_passes.cut_prefill`; the decisions on the host, :mod:`tokensieve.runtimes.atp_llava`).

* where: prefill, before each decoder layer ``k`` in ``layers`` (0-based, ascending), scored with layer ``k - 1``
  on the tokens still present; the layers between two cuts see and cache the tokens kept by the earlier cut, for the
  whole generation (FastV's rule, once per cut);
* redundancy score (paper Eq. 3-4), head means over the image tokens present: ``S_self[i]`` = mean over those image
  keys ``j`` of the pre-softmax logits ``q_i . k_j * scale`` (every such key, the causal mask not applied);
  ``S_cross[i]`` = mean over the positions after the image of the post-softmax probability on image token ``i``
  (0 when no text follows); ``S_r = (S_self + S_cross) / 2``;
* keep image token ``i`` iff ``S_r[i] > threshold`` or ``i`` is on the spatial grid (SAP, Eq. 5: every
  ``stride``-th row and column of the square image-token grid, ``stride = round(sqrt(1 / grid))``; grid tokens
  therefore survive every cut); ``threshold`` is absolute when given, else per image and cut
  ``mean(S_r) + offset * std(S_r)`` (population std) -- the learned, per-instance threshold head replaced by a
  statistic of the same scores. The counts are data-dependent;
* positions: kept tokens keep their original position ids (paper: "original position ids"); decoding continues at
  absolute positions, the layers after cut ``g`` writing slot ``position - dropped_g`` (FastV's decode graphs, one
  slot input per cut).

Plain LLaVA only (one square grid of image tokens); LLaVA-NeXT's packed crops have no single grid for SAP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import PrefillCuts, check_real, spatial_grid
from tokensieve.methods.decoder import LAYOUT_WORDS, DecoderContext


@dataclass(frozen=True)
class ATPLLaVA(PrefillCuts):
    """Keep the image tokens whose redundancy score clears a threshold, plus a spatial grid, before layer ``k``."""

    layers: tuple[int, ...] = (2,)
    threshold: float | None = None
    offset: float = 0.0
    grid: float = 0.25
    name: ClassVar[str] = "atp_llava"

    def __post_init__(self) -> None:
        self.check_layers("layers=[2] or layers=[2, 6]")
        object.__setattr__(self, "threshold", check_real("atp_llava", "threshold", self.threshold))
        object.__setattr__(self, "offset", check_real("atp_llava", "offset", self.offset))
        if self.threshold is not None and self.offset:
            raise MethodSpecError("atp_llava: give threshold (absolute) or offset (relative to the image), not both")
        grid = check_real("atp_llava", "grid", self.grid)
        if grid is None or not 0 <= grid <= 1:
            raise MethodSpecError(f"atp_llava: grid (fraction of image tokens kept) must be in [0, 1], got {grid!r}")
        object.__setattr__(self, "grid", grid)

    def grid_positions(self, image_tokens: int) -> list[int]:
        """Indices (into the image tokens) of the spatial grid on the square ``sqrt(n) x sqrt(n)`` token grid."""
        return spatial_grid("atp_llava", self.grid, image_tokens, "image tokens (CLS kept as a feature breaks it)")

    def validate(self, ctx: DecoderContext) -> None:
        if ctx.layout != "grid":
            raise MethodSpecError(
                f"atp_llava keeps a spatial grid of one square image-token grid; {LAYOUT_WORDS[ctx.layout]}. Export "
                "a plain LLaVA source (hf:llava-tiny, a local checkpoint), or use fastv / dyvte on this model"
            )
        self.check_range(ctx.layers)
        self.grid_positions(ctx.image_tokens)

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        count = image_tokens["count"]
        rule = f"> {self.threshold:g}" if self.threshold is not None else f"> mean + {self.offset:g} std (per image)"
        return (
            f"before each of layers {list(self.layers)}, the image tokens still present whose redundancy score "
            f"(the layer before: image-to-image logits and text-to-image attention) is {rule} stay, plus a spatial "
            f"grid of {len(self.grid_positions(count))} of {count}, with every text token at its original position; "
            f"the host decides between the prefill segments prefill_0..prefill_{len(self.cuts)}, so counts vary per "
            "image"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": list(self.layers),
            "threshold": self.threshold,
            "offset": self.offset,
            "grid": self.grid,
        }

    def describe(self) -> str:
        rule = f"threshold={self.threshold:g}" if self.threshold is not None else f"offset={self.offset:g}"
        return f"atp_llava(layers={list(self.layers)}, {rule}, grid={self.grid:g})"
