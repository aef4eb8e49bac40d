"""Eager SnapKV score (the scoring step; selection and generation: :mod:`tokensieve.reference.prompt_cache`).

Written from the paper and docs/methods.md#snapkv, independently of the graph pass: from one layer's attention
probabilities (Hugging Face's own, ``output_attentions`` with eager attention), the last ``window`` rows summed, the
window's columns zeroed, mean over each KV group's query heads, ``avg_pool1d`` / ``max_pool1d`` (kernel, stride 1,
padding ``kernel // 2``, zero padding counted).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.methods.faces import register
from tokensieve.methods.snapkv import SnapKV


@register("cache_score_reference", SnapKV)
def snapkv_score(attention: torch.Tensor, kv_heads: int, method: SnapKV) -> torch.Tensor:
    """Score ``[kv_heads, T]`` from one layer's attention probabilities ``[1, H, T, T]``."""
    heads, length = attention.shape[1], attention.shape[-1]
    start = length - min(method.window, length)
    score = attention[0, :, start:, :].sum(1)  # [H, T]
    score[:, start:] = 0.0
    score = score.reshape(kv_heads, heads // kv_heads, length).mean(1)[:, None]  # [kv, 1, T]
    pool = F.avg_pool1d if method.pool == "avg" else F.max_pool1d
    return pool(score, method.kernel, stride=1, padding=method.kernel // 2)[:, 0]
