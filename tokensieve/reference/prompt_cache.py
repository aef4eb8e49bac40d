"""Eager prompt-cache compression (SnapKV, A2SF) on a Hugging Face LLaVA / LLaVA-NeXT model: the ground truth of
the compressed prefill graph.

1. the scores come from Hugging Face itself: one unreduced forward with ``output_attentions`` (eager attention)
   gives every layer's attention probabilities; compression happens only after prefill, so they are the ones the
   method sees; the method's scoring step (:mod:`tokensieve.reference.snapkv`, :mod:`tokensieve.reference.a2sf`)
   turns them into a score per KV head and position;
2. selection (:func:`select`): the last ``protected`` positions forced in, a stable descending sort (lower index
   first on ties), the first ``min(T, budget)``, ascending;
3. prefill (:mod:`tokensieve.reference.decoding`) over the whole prompt into a ``transformers.DynamicCache``, whose
   layers' keys/values are then gathered at the selected positions per KV head;
4. greedy decoding at absolute positions, every new token attending to the compressed prompt and the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.methods.a2sf import A2SF
from tokensieve.methods.prompt_cache import PromptCacheCompression
from tokensieve.methods.snapkv import SnapKV
from tokensieve.reference.a2sf import a2sf_score
from tokensieve.reference.decoding import attention_forward, greedy, prefill
from tokensieve.reference.snapkv import snapkv_score


@dataclass
class CompressedResult:
    cache_positions: torch.Tensor  # [layers, kv_heads, K] ascending per head
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens


def select(attention: torch.Tensor, kv_heads: int, method: PromptCacheCompression) -> torch.Tensor:
    """Kept positions ``[kv_heads, K]`` (ascending) from one layer's attention probabilities ``[1, H, T, T]``."""
    if isinstance(method, SnapKV):
        score = snapkv_score(attention, kv_heads, method)
    elif isinstance(method, A2SF):
        score = a2sf_score(attention, kv_heads, method)
    else:
        raise TypeError(f"no eager score for {type(method).__name__}")
    length = score.shape[-1]
    score[:, length - min(method.protected, length) :] = torch.finfo(score.dtype).max
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, : method.kept_count(length)]
    return torch.sort(order, dim=-1).values


def gather_entries(layer, index: torch.Tensor) -> None:
    """Keep the entries ``index [H_kv, n]`` of one ``DynamicCache`` layer, in that order."""
    expanded = index[None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])
    layer.keys, layer.values = layer.keys.gather(2, expanded), layer.values.gather(2, expanded)


@torch.no_grad()
def compressed_prefill(model, inputs: dict, method: PromptCacheCompression):
    """Prefill of processor ``inputs`` with the prompt cache compressed by ``method``: (last-position logits, the
    ``DynamicCache``, kept positions ``[layers, H_kv, K]``, the unreduced forward with every layer's attention)."""
    from transformers import DynamicCache

    full = attention_forward(model, inputs)
    cache = DynamicCache()
    logits = prefill(model, full.hidden_states[0], cache)
    kv_heads = cache.layers[0].keys.shape[1]
    positions = torch.stack([select(a, kv_heads, method) for a in full.attentions])
    for layer, keep in zip(cache.layers, positions, strict=True):
        gather_entries(layer, keep)
    return logits, cache, positions, full


@torch.no_grad()
def compressed_generate(model, inputs: dict, method: PromptCacheCompression, new_tokens: int) -> CompressedResult:
    """Greedy generation with a compressed prompt cache for processor ``inputs`` (batch 1) on a LLaVA(-NeXT)."""
    logits, cache, positions, full = compressed_prefill(model, inputs, method)
    length = full.hidden_states[0].shape[1]
    return CompressedResult(positions, logits, greedy(model, logits, cache, length, new_tokens))
