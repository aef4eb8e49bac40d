"""Eager DyVTE (training-free exit rule) on a Hugging Face LLaVA / LLaVA-NeXT model: the ground truth the exported
graphs are held to.

Written from docs/methods.md#dyvte on the model's own modules, independent of the graph passes: prefill runs the decoder
layers one by one (:func:`tokensieve.reference.decoding.cut_generate`, Hugging Face's own eager attention recorded
in the layer before each candidate exit); before each candidate layer ``k``, the attention probabilities of layer
``k - 1``'s last row on the image tokens still present are summed, averaged over heads, and if that mass is below
``threshold`` every image token is removed (text keeps its positions); then greedy decoding at absolute positions.
"""

from __future__ import annotations

import torch

from tokensieve.methods.dyvte import DyVTE
from tokensieve.reference.decoding import CutResult, cut_generate, reference_face


def image_attention_mass(probs: torch.Tensor, image: torch.Tensor) -> float:
    """Head-mean attention mass of the last row of ``probs [1, H, T, T]`` on the sequence indices ``image``."""
    return float(probs[0, :, -1][:, image].sum(-1).mean())


@reference_face(DyVTE)
@torch.no_grad()
def dyvte_generate(model, inputs: dict, method: DyVTE, new_tokens: int) -> CutResult:
    """DyVTE greedy generation for processor ``inputs`` (batch 1) on a LLaVA(-NeXT) ``model``."""

    def decide(record, positions: torch.Tensor, present: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        mass = image_attention_mass(record["probs"], torch.searchsorted(positions, present))
        exits = len(present) > 0 and mass < method.threshold
        return positions[~torch.isin(positions, image)] if exits else positions

    return cut_generate(model, inputs, method.cuts, decide, new_tokens)
