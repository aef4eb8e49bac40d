"""DyVTE (dynamic visual-token exit) in an MLLM decoder, training-free: the method's single declaration.

DyVTE (docs/methods.md#dyvte; official code DoubtedSteam/DyVTE, no licence file) trains a small router per decoder layer
that decides, from the text tokens' hidden states, when the text has absorbed the image; from that layer on every
visual token is removed. No router checkpoint is published, so tokensieve implements the training-free
approximation. Both faces read this dataclass: the eager reference (``tokensieve.reference.dyvte``) and the deployed
face (the prefill graph cut before each candidate layer into segments, :mod:`tokensieve.graph_passes.cut_prefill`,
with the score of :mod:`tokensieve.graph_passes.image_attention`; the decision on the host,
:mod:`tokensieve.runtimes.dyvte`).

* where: prefill, at the candidate exit points ``layers`` (ascending; a cut before layer ``k`` is decided with
  layer ``k - 1``, the paper's "after layer ``k - 1``");
* score: the attention mass the **last prompt position** puts on the image tokens: layer ``k - 1``'s post-softmax
  probabilities of the last row summed over the image columns, mean over heads;
* exit: the first cut whose mass is below ``threshold`` removes every image token; the layers from there on never
  see them (their cache holds the text only), later cuts keep everything; no exit: nothing is removed;
* positions: text tokens keep their original position ids (paper); decoding continues at absolute positions, the
  layers after an exit writing slot ``position - image_tokens`` (the FastV decode graphs, one slot input per cut).

The image is a contiguous run (LLaVA and LLaVA-NeXT alike: no grid geometry is involved).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import PrefillCuts, check_real
from tokensieve.methods.decoder import DecoderContext


@dataclass(frozen=True)
class DyVTE(PrefillCuts):
    """Remove every image token once the last prompt token's attention mass on them falls below ``threshold``."""

    layers: tuple[int, ...] = (2, 4, 8, 16)
    threshold: float = 0.1
    name: ClassVar[str] = "dyvte"

    def __post_init__(self) -> None:
        self.check_layers("layers=[2, 4, 8]")
        threshold = check_real("dyvte", "threshold", self.threshold)
        if threshold is None or not 0 <= threshold <= 1:
            raise MethodSpecError(f"dyvte: threshold (an attention mass) must be in [0, 1], got {self.threshold!r}")
        object.__setattr__(self, "threshold", threshold)

    def validate(self, ctx: DecoderContext) -> None:
        self.check_range(ctx.layers)

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        return (
            f"before each of layers {list(self.layers)}, every image token is removed once the last prompt token's "
            f"attention mass on the image (the layer before, head mean) is below {self.threshold:g}; text keeps its "
            f"positions; the host decides between the prefill segments prefill_0..prefill_{len(self.cuts)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layers": list(self.layers), "threshold": self.threshold}

    def describe(self) -> str:
        return f"dyvte(layers={list(self.layers)}, threshold={self.threshold:g})"
