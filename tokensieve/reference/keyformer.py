"""Eager Keyformer on a Hugging Face LLaVA / LLaVA-NeXT model: the ground truth of the Keyformer graphs.

Written from docs/methods.md#keyformer, independently of the graph passes, on the model's own attention (Hugging
Face's eager attention recording each layer's query, key and scaling, :mod:`tokensieve.reference.capture`):

1. prompt: every layer's raw logits ``q·kᵀ·scaling`` plus the causal mask, their Gumbel-softmax
   ``softmax((logits + g) / tau_init)`` with the host's noise of step 0
   (:func:`tokensieve.runtimes.keyformer.gumbel_noise`), summed over the query rows and each KV group's query heads;
   the last ``recent`` positions plus the ``key`` highest-scoring earlier ones are kept per layer and KV head
   (:func:`tokensieve.reference.prompt_cache.select_by_score`), with their scores;
2. decoding: H2O's eager eviction (:class:`tokensieve.reference.h2o.HeavyHitters`) with the step's attention replaced
   by the Gumbel-softmax of the step's logits at ``tau_t``, the noise of step ``t`` taken at each cache entry's slot
   (the graph draws per slot; the entries are kept in slot order, the new one last until the next eviction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.methods.faces import register
from tokensieve.methods.keyformer import Keyformer
from tokensieve.reference.capture import capture_attention
from tokensieve.reference.decoding import causal_mask, prefill
from tokensieve.reference.h2o import HeavyHitters, evicting_greedy
from tokensieve.reference.prompt_cache import CompressedPrefill, gather_entries, select_by_score
from tokensieve.runtimes.keyformer import gumbel_noise


@dataclass
class KeyformerResult:
    cache_positions: torch.Tensor  # [layers, kv_heads, K]: prompt positions kept after prefill, ascending
    retained_positions: torch.Tensor  # [layers, kv_heads, n]: positions cached after the last step, ascending
    evicted_positions: torch.Tensor  # [layers, kv_heads, steps]: the position each decode step evicted (-1: none)
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens


def gumbel_scores(record: dict, noise: torch.Tensor, tau: float, mask: torch.Tensor | None) -> torch.Tensor:
    """``softmax((q·kᵀ·scaling + mask + noise) / tau)`` ``[H, rows, n]`` from one layer's recorded attention."""
    query, key = record["query"][0], record["key"][0]  # [H, rows, d], [H_kv, n, d]
    key = key.repeat_interleave(query.shape[0] // key.shape[0], dim=0)
    logits = query @ key.transpose(-1, -2) * record["scaling"]
    if mask is not None:
        logits = logits + mask
    return torch.softmax((logits + noise) / torch.tensor(tau, dtype=logits.dtype), dim=-1)


def _grouped(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[H_kv, n]``: ``[H, rows, n]`` summed over the rows and each KV group's query heads."""
    summed = scores.sum(1)
    return summed.reshape(kv_heads, -1, summed.shape[-1]).sum(1)


@torch.no_grad()
def keyformer_prefill(model, inputs: dict, method: Keyformer) -> CompressedPrefill:
    """The whole prompt prefilled, then each layer's and KV head's cache reduced to Keyformer's selection."""
    from transformers import DynamicCache

    layers = model.model.language_model.layers
    with capture_attention(model, [layer.self_attn for layer in layers]) as records:
        full = model(**inputs, output_hidden_states=True)
        recorded = [records[layer.self_attn] for layer in layers]
    embeds = full.hidden_states[0]
    length, heads, kv_heads = embeds.shape[1], recorded[0]["query"].shape[1], recorded[0]["key"].shape[1]
    noise = torch.from_numpy(gumbel_noise(method.seed, 0, (len(layers), heads, length, length)))
    tau, mask = float(method.tau(0, 1)), causal_mask(length)[0]
    scores = torch.stack(
        [_grouped(gumbel_scores(r, n, tau, mask), kv_heads) for r, n in zip(recorded, noise, strict=True)]
    )
    cache = DynamicCache()
    logits = prefill(model, embeds, cache)
    positions = torch.stack([select_by_score(layer_scores, method) for layer_scores in scores])
    for layer, keep in zip(cache.layers, positions, strict=True):
        gather_entries(layer, keep)
    return CompressedPrefill(logits, cache, positions, scores, length)


class GumbelHitters(HeavyHitters):
    """H2O's eviction state scoring each step with the Gumbel-softmax of the step's logits (see module docstring)."""

    def __init__(self, *args, records: dict, capacity: int, new_tokens: int):
        super().__init__(*args)
        self.records, self.capacity, self.new_tokens, self.start = records, capacity, new_tokens, self.position
        self.noise: torch.Tensor | None = None

    def step_attention(self, index: int, module, output) -> torch.Tensor:
        step = self.position - self.start + 1
        if index == 0:
            heads = output[1].shape[1]
            shape = (len(self.scores), heads, 1, self.capacity)
            self.noise = torch.from_numpy(gumbel_noise(self.method.seed, step, shape))
        noise = self.noise[index, :, 0].gather(1, self._slots(index))  # [H, n]: each entry's slot's noise
        tau = float(self.method.tau(step, self.new_tokens))
        return gumbel_scores(self.records[module], noise[:, None], tau, None)[:, 0]

    def _slots(self, index: int) -> torch.Tensor:
        """``[H, n]``: the slot of every cache entry of layer ``index`` during the step (per query head)."""
        kv, held = self.positions[index].shape
        entries = torch.arange(held + 1).expand(kv, -1)
        if self.pending[index] is None:
            slots = entries
        else:  # compacted after the eviction, the new entry last: it takes the evicted slot
            evicted = self.pending[index][:, None]
            slots = torch.where(entries >= evicted, entries + 1, entries)
            slots[:, -1] = evicted[:, 0]
        heads = self.noise.shape[1]
        return slots.repeat_interleave(heads // kv, dim=0)


@register("reference", Keyformer)
@torch.no_grad()
def keyformer_generate(model, inputs: dict, method: Keyformer, new_tokens: int, capacity: int) -> KeyformerResult:
    """Keyformer greedy generation for processor ``inputs`` (batch 1) on a LLaVA(-NeXT) with a ``capacity``-slot
    decode graph's noise layout."""
    done = keyformer_prefill(model, inputs, method)
    state = (done.cache, done.positions, list(done.scores.gather(2, done.positions)), method, done.length)
    layers = model.model.language_model.layers
    with capture_attention(model, [layer.self_attn for layer in layers]) as records:
        hitters = GumbelHitters(*state, records=records, capacity=capacity, new_tokens=new_tokens)
        ids = evicting_greedy(model, done.logits, hitters, new_tokens)
    retained = torch.stack([p.sort(dim=1).values for p in hitters.positions])
    return KeyformerResult(done.positions, retained, hitters.evictions(), done.logits, ids)
