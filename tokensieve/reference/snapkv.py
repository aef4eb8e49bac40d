"""Eager SnapKV on a Hugging Face LLaVA / LLaVA-NeXT model: the ground truth of the compressed prefill graph.

Written from the paper and METHODS.md §5.5 on the model's own modules, independently of the graph pass:

1. the scores come from Hugging Face itself: one unreduced forward with ``output_attentions`` (eager attention)
   gives every layer's attention probabilities; SnapKV compresses only after prefill, so they are the ones it sees;
2. per layer (:func:`snapkv_select`): the last ``window`` rows summed, window columns zeroed, mean over each KV
   group's query heads, ``avg_pool1d`` / ``max_pool1d`` (kernel, stride 1, padding ``kernel // 2``), the window
   forced in, a stable descending sort (lower index first on ties), the first ``min(T, budget)``, ascending;
3. prefill (:mod:`tokensieve.reference.decoding`) over the whole prompt into a ``transformers.DynamicCache``, whose
   layers' keys/values are then gathered at the selected positions per KV head;
4. greedy decoding at absolute positions, every new token attending to the compressed prompt and the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokensieve.methods.snapkv import SnapKV
from tokensieve.reference.decoding import attention_forward, greedy, prefill


@dataclass
class SnapKVResult:
    cache_positions: torch.Tensor  # [layers, kv_heads, K] ascending per head
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens


def snapkv_select(attention: torch.Tensor, kv_heads: int, method: SnapKV) -> torch.Tensor:
    """Kept positions ``[kv_heads, K]`` (ascending) from one layer's attention probabilities ``[1, H, T, T]``."""
    heads, length = attention.shape[1], attention.shape[-1]
    start = length - min(method.window, length)
    score = attention[0, :, start:, :].sum(1)  # [H, T]
    score[:, start:] = 0.0
    score = score.reshape(kv_heads, heads // kv_heads, length).mean(1)[:, None]  # [kv, 1, T]
    pool = F.avg_pool1d if method.pool == "avg" else F.max_pool1d
    pooled = pool(score, method.kernel, stride=1, padding=method.kernel // 2)[:, 0]
    pooled[:, start:] = float(method.window + 1)
    order = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[:, : method.kept_count(length)]
    return torch.sort(order, dim=-1).values


@torch.no_grad()
def snapkv_generate(model, inputs: dict, method: SnapKV, new_tokens: int) -> SnapKVResult:
    """SnapKV greedy generation for processor ``inputs`` (batch 1) on a LLaVA(-NeXT) ``model``."""
    from transformers import DynamicCache

    full = attention_forward(model, inputs)
    cache = DynamicCache()
    logits = prefill(model, full.hidden_states[0], cache)
    kv_heads = cache.layers[0].keys.shape[1]
    positions = torch.stack([snapkv_select(a, kv_heads, method) for a in full.attentions])
    for layer, keep in zip(cache.layers, positions, strict=True):
        index = keep[None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
    length = full.hidden_states[0].shape[1]
    return SnapKVResult(positions, logits, greedy(model, logits, cache, length, new_tokens))
