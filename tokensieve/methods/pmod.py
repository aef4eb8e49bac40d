"""p-MoD (Mixture-of-Depths MLLM with progressive ratio decay, ICCV 2025) in an MLLM prefill: the method's single
declaration.

Both faces read this dataclass: the eager reference (``tokensieve.reference.pmod``) and the graph face
(``tokensieve.graph_passes.pmod`` on the prefill graph, one decode cache slot per MoD layer). Semantics
(docs/methods.md#p-mod):

* schedule (progressive ratio decay, the official ``shiftedcos_decay_<max>_<min>`` generalised from 32 to ``L``
  decoder layers): ``r(l) = cos(l * pi / (L - 1)) / 2 + 0.5``; layer ``l`` is a MoD layer iff ``r(l) <= max_ratio``
  and then keeps ``ratio(l) = max(r(l), min_ratio)`` of the image tokens. ``r`` decreases with ``l``, so the MoD
  layers are ``first..L-1``; layer 0 (``r = 1``) never is one;
* count: ``k(l) = floor(N * ratio32(l))`` image tokens of ``N``, with ``ratio32`` the float32 value of the ratio, in
  exact integer arithmetic (:meth:`PMoD.processed_image`);
* in a MoD layer only the ``k(l)`` chosen image tokens and every text token run the layer, on their own causal mask
  and at their original position ids; the other image tokens skip it (``h_out = h``) and contribute no key/value
  there, so the layer caches only the positions it processed (each MoD layer its own decode cache slot);
* choice, training-free (``routers=None``): the image tokens the text after the image attends to most in the last
  layer every token runs (``first - 1``): that layer's post-softmax probabilities, rows after the image, mean over
  heads, summed over those rows; the top ``k(l)`` (ties: lower position first) in every MoD layer (nested sets);
* choice with routers (``routers="routers.npz"``: the official checkpoint's ``Linear(hidden -> 1)`` per MoD layer,
  keys ``model.layers.<l>.router.router.weight`` ``[1, D]`` and optional ``.bias`` ``[1]``): per MoD layer
  ``w = 0.2 * tanh(router(h)) + 1`` on the stream entering the layer, the top ``k(l)`` image tokens by ``w``; the
  chosen ones give ``w * MLP_out + (h + Attn(h))``, the skipped ones ``w * h``, text tokens the plain layer.

Decoding is unchanged (every new token is text: each layer processes it and attends to its own cache).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.decoder import DecoderContext, DecoderMethod, PlanCost, PlanInput


def _float32(value: float) -> Fraction:
    """The exact value of ``value`` rounded to float32."""
    return Fraction(struct.unpack("f", struct.pack("f", value))[0])


def _threshold(value: Any, argument: str, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)) or not 0 < value < 1:
        raise MethodSpecError(f"pmod: {argument} must be a number in (0, 1), got {value!r}; e.g. {example}")
    return float(value)


@dataclass(frozen=True)
class PMoD(DecoderMethod):
    """In the MoD layers (progressive ratio decay), only the chosen image tokens and the text run the layer."""

    max_ratio: float = 0.85
    min_ratio: float = 0.15
    routers: str | None = None
    name: ClassVar[str] = "pmod"
    data_dependent: ClassVar[bool] = False
    kept_fields: ClassVar[tuple[str, ...]] = ("cut_positions",)  # the positions each MoD layer processed

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_ratio", _threshold(self.max_ratio, "max_ratio", "max_ratio=0.85"))
        object.__setattr__(self, "min_ratio", _threshold(self.min_ratio, "min_ratio", "min_ratio=0.15"))
        if self.min_ratio > self.max_ratio:
            raise MethodSpecError(
                f"pmod: min_ratio={self.min_ratio:g} is above max_ratio={self.max_ratio:g}; MoD layers keep at least "
                "min_ratio and start where the schedule falls to max_ratio, so use min_ratio <= max_ratio"
            )
        if self.routers is not None and (not isinstance(self.routers, str) or not self.routers.endswith(".npz")):
            raise MethodSpecError(
                f"pmod: routers must be the path of an .npz file with the router weights, got {self.routers!r}; "
                'e.g. routers="routers.npz" (keys model.layers.<l>.router.router.weight / .bias)'
            )
        if self.routers is not None:  # absolute, so the manifest's method finds the file from anywhere
            object.__setattr__(self, "routers", str(Path(self.routers).resolve()))

    @staticmethod
    def decay(layer: int, layers: int) -> float:
        """The shifted-cosine schedule ``cos(layer * pi / (layers - 1)) / 2 + 0.5`` (float64, as the official)."""
        return math.cos(layer * math.pi / (layers - 1)) / 2 + 0.5

    def mod_layers(self, layers: int) -> list[int]:
        """The MoD layers of a ``layers``-layer decoder (ascending; ``first..layers-1``)."""
        if layers < 2:
            return []
        return [i for i in range(layers) if self.decay(i, layers) <= self.max_ratio]

    def ratio(self, layer: int, layers: int) -> Fraction:
        """The float32 ratio of image tokens MoD layer ``layer`` processes, exactly."""
        return _float32(max(self.decay(layer, layers), self.min_ratio))

    def processed_image(self, layer: int, layers: int, image_tokens: int) -> int:
        """``k = floor(image_tokens * ratio32)``: the image tokens MoD layer ``layer`` processes."""
        ratio = self.ratio(layer, layers)
        return image_tokens * ratio.numerator // ratio.denominator

    def check_layers(self, layers: int) -> list[int]:
        mod = self.mod_layers(layers)
        if not mod:
            raise MethodSpecError(
                f"pmod: with max_ratio={self.max_ratio:g} this {layers}-layer decoder has no MoD layer (the schedule "
                "cos(l*pi/(L-1))/2+0.5 never falls to max_ratio); raise max_ratio or use a deeper decoder"
            )
        return mod

    def validate(self, ctx: DecoderContext) -> None:
        self.check_layers(ctx.layers)
        if self.routers is not None and not Path(self.routers).is_file():
            raise MethodSpecError(f"pmod: the router weights file {self.routers!r} does not exist; give its path")

    def dynamic(self, graphs: Iterable[str]) -> dict[str, str]:
        return {"prefill": "sequence and image_tokens (p-MoD: each MoD layer's length is an expression of both)"}

    def plan(self, p: PlanInput) -> PlanCost:
        mod = set(self.check_layers(p.layers))
        text = p.length - p.image_tokens
        tokens = [
            text + self.processed_image(i, p.layers, p.image_tokens) if i in mod else p.length for i in range(p.layers)
        ]
        # the training-free score reads probabilities the scoring layer computes anyway; a router is Linear(D -> 1)
        scoring = len(mod) * p.length * p.heads * p.head_dim if self.routers else 0
        return PlanCost(tokens, [t + p.new_tokens for t in tokens], p.length + p.new_tokens, scoring)

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        layers = decoder["layers"]
        mod = self.mod_layers(layers)
        if not mod:
            return f"no MoD layer in this {layers}-layer decoder"
        count = image_tokens.get("count")
        shares = ", ".join(
            f"{i}: {self.processed_image(i, layers, count)}" if count else f"{i}: {float(self.ratio(i, layers)):.3f}"
            for i in mod
        )
        chooser = (
            "their routers (w = 0.2 tanh(logit) + 1 weighs the image tokens)"
            if self.routers
            else f"the attention of the text after the image in layer {mod[0] - 1}"
        )
        of = f" of {count}" if count else " (share of the image)"
        return (
            f"MoD layers {mod[0]}..{layers - 1} run only the text and the image tokens chosen by {chooser}; "
            f"image tokens processed per layer{of}: {shares}; skipped tokens pass unchanged and are not cached"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "max_ratio": self.max_ratio, "min_ratio": self.min_ratio, "routers": self.routers}

    def describe(self) -> str:
        routers = f", routers={self.routers!r}" if self.routers else ""
        return f"pmod(max_ratio={self.max_ratio:g}, min_ratio={self.min_ratio:g}{routers})"
