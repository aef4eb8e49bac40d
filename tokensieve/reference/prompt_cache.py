"""Eager prompt-cache compression (SnapKV, A2SF; H2O's prefill) on a Hugging Face LLaVA / LLaVA-NeXT model: the
ground truth of the compressed prefill graph.

1. the scores come from Hugging Face itself: one unreduced forward with ``output_attentions`` (eager attention)
   gives every layer's attention probabilities; compression happens only after prefill, so they are the ones the
   method sees; the method's scoring step (:mod:`tokensieve.reference.snapkv`, :mod:`tokensieve.reference.a2sf`)
   turns them into a score per KV head and position (:func:`score`);
2. selection (:func:`select_by_score`): the last ``protected`` positions forced in, a stable descending sort (lower
   index first on ties), the first ``min(T, budget)``, ascending;
3. prefill (:mod:`tokensieve.reference.decoding`) over the whole prompt into a ``transformers.DynamicCache``, whose
   layers' keys/values are then gathered at the selected positions per KV head;
4. greedy decoding at absolute positions, every new token attending to the compressed prompt and the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.methods.prompt_cache import PromptCacheCompression
from tokensieve.reference import FACES
from tokensieve.reference.decoding import attention_forward, greedy, prefill, reference_face


@dataclass
class CompressedResult:
    cache_positions: torch.Tensor  # [layers, kv_heads, K] ascending per head
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens


def score(attention: torch.Tensor, kv_heads: int, method: PromptCacheCompression) -> torch.Tensor:
    """The method's score ``[kv_heads, T]`` from one layer's attention probabilities ``[1, H, T, T]``."""
    scorer = FACES.lookup("cache_score_reference", method, None)
    if scorer is None:
        raise TypeError(f"no eager score for {type(method).__name__}")
    return scorer(attention, kv_heads, method)


def select_by_score(scores: torch.Tensor, method: PromptCacheCompression) -> torch.Tensor:
    """Kept positions ``[kv_heads, K]`` (ascending) from a score ``[kv_heads, T]``."""
    length = scores.shape[-1]
    protected = torch.arange(length) >= length - method.protected_count(length)
    priority = torch.where(protected, torch.finfo(scores.dtype).max, scores)
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices[:, : method.kept_count(length)]
    return torch.sort(order, dim=-1).values


def select(attention: torch.Tensor, kv_heads: int, method: PromptCacheCompression) -> torch.Tensor:
    """Kept positions ``[kv_heads, K]`` (ascending) from one layer's attention probabilities ``[1, H, T, T]``."""
    return select_by_score(score(attention, kv_heads, method), method)


def gather_entries(layer, index: torch.Tensor) -> None:
    """Keep the entries ``index [H_kv, n]`` of one ``DynamicCache`` layer, in that order."""
    expanded = index[None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])
    layer.keys, layer.values = layer.keys.gather(2, expanded), layer.values.gather(2, expanded)


@dataclass
class CompressedPrefill:
    logits: torch.Tensor  # [V] at the last prompt position
    cache: object  # transformers.DynamicCache holding the kept positions
    positions: torch.Tensor  # [layers, kv_heads, K] kept, ascending per head
    scores: torch.Tensor  # [layers, kv_heads, T] the method's score of every prompt position
    length: int  # prompt positions T


@torch.no_grad()
def compressed_prefill(model, inputs: dict, method: PromptCacheCompression) -> CompressedPrefill:
    """Prefill of processor ``inputs`` with the prompt cache compressed by ``method``."""
    from transformers import DynamicCache

    full = attention_forward(model, inputs)
    cache = DynamicCache()
    logits = prefill(model, full.hidden_states[0], cache)
    kv_heads = cache.layers[0].keys.shape[1]
    scores = torch.stack([score(a, kv_heads, method) for a in full.attentions])
    positions = torch.stack([select_by_score(layer_scores, method) for layer_scores in scores])
    for layer, keep in zip(cache.layers, positions, strict=True):
        gather_entries(layer, keep)
    return CompressedPrefill(logits, cache, positions, scores, full.hidden_states[0].shape[1])


@reference_face(PromptCacheCompression)
@torch.no_grad()
def compressed_generate(model, inputs: dict, method: PromptCacheCompression, new_tokens: int) -> CompressedResult:
    """Greedy generation with a compressed prompt cache for processor ``inputs`` (batch 1) on a LLaVA(-NeXT)."""
    done = compressed_prefill(model, inputs, method)
    ids = greedy(model, done.logits, done.cache, done.length, new_tokens)
    return CompressedResult(done.positions, done.logits, ids)
