"""Eager StreamingLLM on a Hugging Face LLaVA / LLaVA-NeXT model: the ground truth of the ring-cache decode graph.

Written from docs/methods.md#streamingllm with the kvpress / H2O position rule (keys cached after RoPE at their original
positions, new tokens at absolute positions): prefill over the whole prompt with the model's own layers; the cache
is then cut to the first ``sink`` positions plus the most recent ones so that it holds ``capacity`` positions, and
before every decode step to ``capacity - 1`` (the new token's key makes ``capacity``). The cache is a
``transformers.DynamicCache`` kept in position order: nothing here knows about ring slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.methods.faces import register
from tokensieve.methods.streamingllm import StreamingLLM
from tokensieve.reference.decoding import greedy, prefill


@dataclass
class StreamingResult:
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens


def _keep(cache, method: StreamingLLM, budget: int) -> None:
    """Cut every layer of ``cache`` to its first ``sink`` and last ``budget - sink`` positions."""
    for layer in cache.layers:
        if layer.keys.shape[2] > budget:
            recent = budget - method.sink
            layer.keys = torch.cat([layer.keys[:, :, : method.sink], layer.keys[:, :, -recent:]], dim=2)
            layer.values = torch.cat([layer.values[:, :, : method.sink], layer.values[:, :, -recent:]], dim=2)


@torch.no_grad()
def streaming_generate(model, inputs: dict, method: StreamingLLM, capacity: int, new_tokens: int) -> StreamingResult:
    """StreamingLLM greedy generation for processor ``inputs`` (batch 1) with a ``capacity``-position cache."""
    from transformers import DynamicCache

    embeds = model(**inputs, output_hidden_states=True).hidden_states[0]
    cache = DynamicCache()
    logits = prefill(model, embeds, cache)
    _keep(cache, method, capacity)
    ids = greedy(model, logits, cache, embeds.shape[1], new_tokens, evict=lambda: _keep(cache, method, capacity - 1))
    return StreamingResult(logits, ids)


@register("reference", StreamingLLM)
def reference(model, inputs: dict, method: StreamingLLM, new_tokens: int, capacity: int) -> StreamingResult:
    """The eager reference parity holds an artifact to: the artifact's cache capacity is the budget."""
    return streaming_generate(model, inputs, method, capacity, new_tokens)
