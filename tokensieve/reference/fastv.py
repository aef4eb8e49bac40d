"""Eager FastV on a Hugging Face LLaVA / LLaVA-NeXT model: the ground truth the exported graphs are held to.

Written from the paper and docs/methods.md#fastv on the model's own modules, independently of the graph pass:

1. the score comes from Hugging Face itself: one unreduced forward with ``output_attentions`` (eager attention)
   gives layer ``k - 1``'s attention probabilities (FastV changes nothing before layer ``k``, so they are the
   same); row = last prompt position, mean over heads, columns = the image positions;
2. selection: a stable descending sort (lower index first on ties), the first ``R`` image positions, united with
   every text position, ascending;
3. prefill (:mod:`tokensieve.reference.decoding`): the decoder layers run one by one on the merged embeddings
   (``hidden_states[0]`` of that forward); before layer ``k`` the stream and the position ids are gathered at the
   kept positions and the causal mask is rebuilt for the shorter sequence; keys/values go to a
   ``transformers.DynamicCache`` (each layer its own length);
4. greedy decoding at absolute positions, every layer attending to all of its cached positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.methods.fastv import FastV
from tokensieve.reference.decoding import attention_forward, greedy, prefill, reference_face


@dataclass
class FastVResult:
    kept_positions: torch.Tensor  # [T'] ascending
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens


def fastv_select(attention: torch.Tensor, image: torch.Tensor, length: int, method: FastV) -> torch.Tensor:
    """Kept positions from one layer's attention probabilities ``[1, H, T, T]`` and the image positions."""
    score = attention[0, :, -1, :].mean(0)[image]
    order = torch.sort(score, descending=True, stable=True).indices
    chosen = image[order[: method.kept_count(len(image))]]
    text = torch.ones(length, dtype=torch.bool)
    text[image] = False
    return torch.sort(torch.cat([torch.nonzero(text)[:, 0], chosen])).values


@reference_face(FastV)
@torch.no_grad()
def fastv_generate(model, inputs: dict, method: FastV, new_tokens: int) -> FastVResult:
    """FastV greedy generation for processor ``inputs`` (batch 1) on a LLaVA(-NeXT) ``model``."""
    from transformers import DynamicCache

    full = attention_forward(model, inputs)
    ids = inputs["input_ids"][0]
    length = len(ids)
    image = torch.nonzero(ids == model.config.image_token_id)[:, 0]
    keep = fastv_select(full.attentions[method.k - 1], image, length, method)

    cache = DynamicCache()
    logits = prefill(model, full.hidden_states[0], cache, lambda index, _: keep if index == method.k else None)
    return FastVResult(keep, logits, greedy(model, logits, cache, length, new_tokens))
