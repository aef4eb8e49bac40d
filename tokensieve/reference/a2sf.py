"""Eager A2SF score (the scoring step; selection and generation: :mod:`tokensieve.reference.prompt_cache`).

Written from docs/methods.md#a2sf (the official code's current one-shot prefill form), independently of the graph pass:
from one layer's attention probabilities ``[1, H, T, T]`` (Hugging Face's own), every query row ``q`` weighted by
``forgetting_factor ** (T - 1 - q)``, summed over the rows and over each KV group's query heads.
"""

from __future__ import annotations

import torch

from tokensieve.methods.a2sf import A2SF
from tokensieve.methods.faces import register


@register("cache_score_reference", A2SF)
def a2sf_score(attention: torch.Tensor, kv_heads: int, method: A2SF) -> torch.Tensor:
    """Score ``[kv_heads, T]`` from one layer's attention probabilities ``[1, H, T, T]``."""
    heads, length = attention.shape[1], attention.shape[-1]
    age = torch.arange(length - 1, -1, -1, dtype=attention.dtype)
    weights = torch.tensor(float(method.forgetting_factor), dtype=attention.dtype) ** age  # newest row: 1
    accumulated = (attention[0] * weights[None, :, None]).sum(1)  # [H, T]
    return accumulated.reshape(kv_heads, heads // kv_heads, length).sum(1)
