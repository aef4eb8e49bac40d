"""MustDrop (multi-stage vision token dropping) in a LLaVA MLLM: the method's single declaration.

Semantics of the official code (liuting20/MustDrop @ 909afa5, unlicensed: read, not copied): docs/methods.md#mustdrop.
Both faces read this dataclass: the eager reference (``tokensieve.reference.mustdrop``) and the deployed face (the
vision graph split after CLIP layer 0 with the window similarities as outputs and the last layer's CLS attention,
:mod:`tokensieve.converters.llava`; the prefill graph cut after each filter layer with the dual-attention scores as
outputs, :mod:`tokensieve.graph_passes.dual_attention`; the decode graphs' later layers on their own slot and
positions; the decisions on the host, :mod:`tokensieve.runtimes.mustdrop`).

* stage 1a, vision (``merge_threshold``; ``None`` turns it off): CLIP layer 0's output, CLS aside, the ``24 x 24``
  patch grid in non-overlapping ``3 x 3`` windows (raster order); a window's similarity is the mean pairwise cosine
  of its 9 tokens (self pairs excluded); the ``r`` windows with similarity ``>= merge_threshold`` each become one
  token, the plain mean of the 9 (sizes are not tracked: no proportional attention), at the bottom-right token's
  place. Token order after it: ``[CLS, merged windows (descending similarity; ties: lower window first), unmerged
  tokens (ascending)]``: ``1 + n - 8 r`` tokens through the remaining CLIP layers, the image features in that order;
* stage 1b, key set: the last CLIP layer's post-softmax attention (the layer that reads the feature layer
  ``-2``), CLS row, patch columns, head mean: its top ``ceil(key_ratio * n')`` image tokens (``n'`` = image tokens
  after stage 1a; ties: lower index first) are never dropped in the decoder;
* stage 2, prefill filter after each decoder layer ``L`` of ``layers``, scored with layer ``L``'s own attention:
  the post-softmax probabilities of every row after the image on the image tokens present, head mean, give ``g``
  (column sums) and ``m`` (column maxima); an image token is dropped iff ``g < global_threshold * sum(g)`` and
  ``m < individual_threshold`` and it is not in the key set. The layers after ``L`` see the kept tokens with
  **contiguous** position ids ``0..T'-1``;
* stage 3, cache: after prefill, every layer from ``layers[0]`` on keeps only the final kept positions (layers
  before it keep the full prompt), and decoding writes and rotates those layers at their own cache length
  (``position - dropped``), the earlier layers at the absolute position, as the official code does per layer.

Plain LLaVA only (one square grid of patch tokens, CLS dropped from the features).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import PrefillCuts, ceil_fraction, check_keep, check_layers, check_real
from tokensieve.methods.decoder import LAYOUT_WORDS, DecoderContext

WINDOW = 3  # the official 3 x 3 windows


@dataclass(frozen=True)
class MustDrop(PrefillCuts):
    """Merge similar vision windows, then drop image tokens little attended to after decoder ``layers``."""

    layers: tuple[int, ...] = (2, 6, 10, 14)
    global_threshold: float = 0.001
    individual_threshold: float = 0.001
    key_ratio: Fraction = Fraction(2, 25)
    merge_threshold: float | None = 0.8
    name: ClassVar[str] = "mustdrop"
    split_vision: ClassVar[bool] = True
    contiguous_positions: ClassVar[bool] = True
    final_cache: ClassVar[bool] = True
    shortens_prompt: ClassVar[bool] = True
    kept_fields: ClassVar[tuple[str, ...]] = ("merged_windows", "key_set", "cut_positions")
    kept_separated: ClassVar[bool] = True

    def __post_init__(self) -> None:
        layers = check_layers(self.name, self.layers)
        if not layers or layers[0] < 1:
            raise MethodSpecError(
                "mustdrop: layers must list the decoder layers (>= 1: the layers before the first keep the full "
                f"cache) that filter after themselves, e.g. layers=[2, 6, 10, 14]; got {self.layers!r}"
            )
        object.__setattr__(self, "layers", layers)
        for key in ("global_threshold", "individual_threshold"):
            value = check_real(self.name, key, getattr(self, key))
            if value is None or value < 0:
                raise MethodSpecError(f"mustdrop: {key} must be a number >= 0, got {getattr(self, key)!r}")
            object.__setattr__(self, key, value)
        object.__setattr__(self, "key_ratio", check_keep(self.name, self.key_ratio, "key_ratio=0.08", "key_ratio"))
        merge = check_real(self.name, "merge_threshold", self.merge_threshold)
        if merge is not None and not -1 <= merge <= 1:
            raise MethodSpecError(f"mustdrop: merge_threshold (a cosine) must be in [-1, 1], got {merge!r}")
        object.__setattr__(self, "merge_threshold", merge)

    @property
    def cuts(self) -> tuple[int, ...]:
        """The prefill is cut after each filter layer ``L`` (before ``L + 1``), scored with layer ``L``."""
        return tuple(layer + 1 for layer in self.layers)

    @property
    def cache_cuts(self) -> tuple[int, ...]:
        """The decode graphs' groups: the layers from the first filter layer on hold the final kept positions."""
        return self.layers[:1]

    def key_count(self, image_tokens: int) -> int:
        """``ceil(key_ratio * image_tokens)`` in exact integer arithmetic."""
        return ceil_fraction(self.key_ratio, image_tokens)

    def windows(self, image_tokens: int) -> list[list[int]]:
        """The ``3 x 3`` windows of the square patch grid: per window (raster order), its tokens in raster order."""
        side = math.isqrt(image_tokens)
        if side * side != image_tokens or side % WINDOW:
            raise MethodSpecError(
                f"mustdrop: the window merge needs a square patch grid with a side divisible by {WINDOW}, but there "
                f"are {image_tokens} patch tokens; use merge_threshold=None"
            )
        return [
            [(top + a) * side + left + c for a in range(WINDOW) for c in range(WINDOW)]
            for top in range(0, side, WINDOW)
            for left in range(0, side, WINDOW)
        ]

    def vision_windows(self, image_tokens: int) -> list[list[int]] | None:
        return None if self.merge_threshold is None else self.windows(image_tokens)

    def dynamic(self, graphs: Iterable[str]) -> dict[str, str]:
        return {"vision_1": "vision_tokens (CLS + the tokens left after the window merge)", **super().dynamic(graphs)}

    def validate(self, ctx: DecoderContext) -> None:
        layers, strategy, image_tokens = ctx.layers, ctx.select_strategy, ctx.image_tokens
        if ctx.layout != "grid":
            raise MethodSpecError(
                f"mustdrop merges windows of one square patch grid; {LAYOUT_WORDS[ctx.layout]}. Export a plain "
                "LLaVA source (hf:llava-tiny, a local checkpoint), or use fastv / dyvte on this model"
            )
        if strategy != "default":
            raise MethodSpecError(
                "mustdrop's key set indexes the patch features; this model keeps CLS as an image feature "
                "(vision_feature_select_strategy='full'), which the official method does not cover"
            )
        if self.merge_threshold is not None:
            self.windows(image_tokens)
        if layers < 3:
            raise MethodSpecError(
                f"mustdrop filters after a layer >= 1 with a layer after it, so the decoder needs at least 3 layers; "
                f"this one has {layers}"
            )
        if self.layers[-1] + 1 >= layers:
            raise MethodSpecError(
                f"mustdrop: filter layer {self.layers[-1]} is out of range; this decoder has {layers} layers and a "
                f"filter needs a layer after it (1..{layers - 2})"
            )

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        count = image_tokens["count"]
        merge = (
            "no window merge"
            if self.merge_threshold is None
            else f"the 3x3 windows of the {count} patch tokens with mean cosine >= {self.merge_threshold:g} after "
            "CLIP layer 0 merge into one token each (host, between vision_0 and vision_1)"
        )
        return (
            f"{merge}; a key set of ceil({float(self.key_ratio):g} * n) image tokens (the last CLIP layer's CLS "
            f"attention) is never dropped; after each of layers {list(self.layers)} the image tokens whose "
            f"attention from the text after the image is below {self.global_threshold:g} of the total (column "
            f"sum) and below {self.individual_threshold:g} (column max) are dropped, later layers at contiguous "
            f"positions; the host decides between prefill_0..prefill_{len(self.cuts)}, and after prefill layers "
            f"{self.layers[0]}.. keep only the final tokens' cache"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": list(self.layers),
            "global_threshold": self.global_threshold,
            "individual_threshold": self.individual_threshold,
            "key_ratio": str(self.key_ratio),
            "merge_threshold": self.merge_threshold,
        }

    def describe(self) -> str:
        merge = "None" if self.merge_threshold is None else f"{self.merge_threshold:g}"
        return (
            f"mustdrop(layers={list(self.layers)}, global_threshold={self.global_threshold:g}, individual_threshold="
            f"{self.individual_threshold:g}, key_ratio={float(self.key_ratio):g}, merge_threshold={merge})"
        )
