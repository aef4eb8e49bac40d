"""GlobalCom² (AAAI 2026) visual-token compression for LLaVA-NeXT: the method's single declaration.

Both faces read this dataclass: the eager reference (``tokensieve.reference.globalcom2``, torch, on the Hugging Face
model) and the deployed face: the vision graph gains an output ``cls_scores [P, n]`` (the converter exports it) and
the host selects with :mod:`tokensieve.runtimes.globalcom2` (numpy), where LLaVA-NeXT's AnyRes geometry already
lives. Semantics (docs/methods.md#globalcom2, official code at 96b2d00):

* score: the **last** CLIP layer's head-mean pre-softmax attention logits ``(q * scale) . k``, CLS row, patch
  columns, for the thumbnail and every crop (the features still come from ``vision_feature_layer``);
* thumbnail: the top ``floor(retention * n)`` tokens, emitted in descending score order (ties: lower index first);
* crop budgets: thumbnail scores summed per crop cell, ``p = softmax((s - max s) / temperature)``,
  ``scale_i = min(retention * (1 + p_i - mean p), 1)``; crop ``i`` keeps ``int(N_i * scale_i)`` of its ``N_i``
  tokens left after unpadding (float64, as the official NumPy code);
* crop selection: ``L2norm(crop CLS scores) + L2norm(thumbnail scores bilinearly resized to the unpadded grid)``,
  top-k per crop; kept tokens stay at their grid positions, every row keeps its ``image_newline``;
* output: ``[thumbnail kept, unpadded grid rows (kept tokens + newline)]``; position ids stay contiguous.

``layout="official"`` reproduces the official code's packing instead, which differs where a crop holds padding: it
writes the ``j``-th kept token of a crop's valid-token list at the crop's ``j``-th raster position (the real positions
are computed, ``get_original_indices``, but unused), and appends a newline to every row of the padded grid. The
selection is the same in both layouts; ``"grid"`` (the default) keeps each token at its own place, as LLaVA-NeXT
packs features and as the paper describes it.

The prompt gets one ``<image>`` placeholder per kept feature, so prefill runs on the shorter sequence; the decoder
graphs are unchanged. The official code casts the features to fp16; tokensieve keeps the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import check_keep
from tokensieve.methods.decoder import LAYOUT_WORDS, DecoderContext, DecoderMethod

LAYOUTS = ("grid", "official")


@dataclass(frozen=True)
class GlobalCom2(DecoderMethod):
    """Keep ``retention`` of LLaVA-NeXT's image tokens, crops budgeted by the thumbnail's attention."""

    retention: Fraction = Fraction(1, 4)
    temperature: Fraction = Fraction(10)
    layout: str = "grid"
    name: ClassVar[str] = "globalcom2"
    cls_scores: ClassVar[bool] = True
    shortens_prompt: ClassVar[bool] = True
    kept_fields: ClassVar[tuple[str, ...]] = ("kept_features",)  # the vision tokens the image keeps, in prompt order

    def __post_init__(self) -> None:
        example = "retention=0.25 keeps a quarter of the image tokens"
        retention = check_keep("globalcom2", self.retention, example, argument="retention")
        object.__setattr__(self, "retention", retention)
        value = self.temperature
        if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)) or value <= 0:
            raise MethodSpecError(f"globalcom2: temperature must be a positive number, got {value!r}")
        object.__setattr__(self, "temperature", Fraction(str(value)) if isinstance(value, float) else Fraction(value))
        if self.layout not in LAYOUTS:
            raise MethodSpecError(f"globalcom2: layout must be one of {LAYOUTS}, got {self.layout!r}")

    def thumbnail_count(self, tokens: int) -> int:
        """``floor(retention * tokens)`` thumbnail tokens kept, exact integer arithmetic."""
        return self.retention.numerator * tokens // self.retention.denominator

    def validate(self, ctx: DecoderContext) -> None:
        strategy = ctx.select_strategy
        if ctx.layout != "anyres":
            raise MethodSpecError(
                "globalcom2 compresses AnyRes crops (unpadded grid with row newlines) under the guidance of the "
                f"thumbnail's CLS attention; {LAYOUT_WORDS[ctx.layout]}. Export a LLaVA-NeXT source "
                "(hf:llava-next-tiny, a local checkpoint), or use fastv / snapkv on this model"
            )
        if strategy != "default":
            raise MethodSpecError(
                f"globalcom2 scores the patch tokens from the CLS row; vision_feature_select_strategy={strategy!r} "
                "keeps CLS among the features, which the method does not define"
            )

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        tokens = image_tokens["per_crop"]
        layout = "the official code's packing" if self.layout == "official" else "grid positions"
        return (
            f"the image keeps {self.thumbnail_count(tokens)} of {tokens} thumbnail tokens and about "
            f"{float(self.retention):g} of each crop's (budgets from the thumbnail's attention, temperature "
            f"{float(self.temperature):g}) plus the row newlines ({layout}); the host selects from the vision "
            "graph's cls_scores, and prefill runs on the shorter prompt"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "retention": str(self.retention),
            "temperature": str(self.temperature),
            "layout": self.layout,
        }

    def describe(self) -> str:
        layout = "" if self.layout == "grid" else f", layout={self.layout}"
        return f"globalcom2(retention={float(self.retention):g}, temperature={float(self.temperature):g}{layout})"
