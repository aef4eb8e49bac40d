"""Eager H2O on a Hugging Face LLaVA / LLaVA-NeXT model: the ground truth of the H2O prefill and decode graphs.

Written from docs/methods.md#h2o (the official real-drop form), independently of the graph passes:

1. prefill over the whole prompt, then the prompt-cache selection (:mod:`tokensieve.reference.prompt_cache`) with
   H2O's score, the attention every position received from all prompt queries (Hugging Face's own probabilities,
   summed over each KV group's query heads); the kept positions start with that score;
2. greedy decoding with the model's own layers under eager attention, each layer's step probabilities captured by a
   forward hook on its attention module; after every step, per layer and KV head, the step's attention is added to
   the scores (the new token's starts with its own; with a ``forgetting_factor`` below 1, A2SF's decode-time form,
   the old scores are multiplied by it first) and, once ``budget + 1`` positions are cached, the lowest-scoring one
   older than the last ``recent`` positions is evicted (first index on ties). ``budget`` and ``recent`` are
   ``method.window(T)``; a subclass of :class:`HeavyHitters` may score the step otherwise (``step_attention``:
   Keyformer, :mod:`tokensieve.reference.keyformer`).

The cache entries are kept in the graph's slot order (the new token takes the place of the entry evicted before it,
see :mod:`tokensieve.methods.h2o`), so a tie resolves to the same entry on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.methods.h2o import H2O
from tokensieve.reference.decoding import eager_attention, greedy, reference_face
from tokensieve.reference.prompt_cache import compressed_prefill, gather_entries


@dataclass
class H2OResult:
    cache_positions: torch.Tensor  # [layers, kv_heads, K]: prompt positions kept after prefill, ascending
    retained_positions: torch.Tensor  # [layers, kv_heads, n]: positions cached after the last step, ascending
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens


class HeavyHitters:
    """Per layer: the position and accumulated score of every cache entry, and the entry index the next new token
    takes (the one evicted last, per KV head)."""

    def __init__(self, cache, positions: torch.Tensor, scores: list[torch.Tensor], method: H2O, start: int):
        self.cache, self.method, self.position = cache, method, start
        self.budget, self.recent = method.window(start)
        self.positions, self.scores = list(positions), scores
        self.pending: list[torch.Tensor | None] = [None] * len(scores)
        self.steps: list[torch.Tensor | None] = [None] * len(scores)  # the last step's [H, n] attention
        self.evicted: list[torch.Tensor] = []  # per step [layers, kv]: the position evicted (-1: not full yet)

    def capture(self, index: int):
        def hook(module, args, output) -> None:
            self.steps[index] = self.step_attention(index, module, output)

        return hook

    def step_attention(self, index: int, module, output) -> torch.Tensor:
        """The attention ``[H, n]`` each cache entry received in the step just run by layer ``index`` (H2O: the
        layer's own probabilities)."""
        return output[1][0, :, -1]

    def update(self) -> None:
        """Account for the step just run (its new entry is the last one in the cache), then evict."""
        if self.steps[0] is None:
            return
        evicted = torch.full((len(self.scores), self.positions[0].shape[0]), -1, dtype=torch.long)
        for index, layer in enumerate(self.cache.layers):
            probs = self.steps[index]  # [H, n]
            kv = layer.keys.shape[1]
            step = probs.reshape(kv, -1, probs.shape[-1]).sum(1)
            new = torch.full((kv, 1), self.position, dtype=torch.long)
            positions = torch.cat([self.positions[index], new], dim=1)
            old = self.scores[index] * float(self.method.forgetting_factor)  # A2SF's forgetting (1: H2O)
            scores = torch.cat([old, torch.zeros(kv, 1, dtype=step.dtype)], dim=1) + step
            if self.pending[index] is not None:  # the new entry goes where the evicted one was
                order = [self._insert(int(slot), positions.shape[1]) for slot in self.pending[index]]
                perm = torch.tensor(order)
                gather_entries(layer, perm)
                positions, scores = positions.gather(1, perm), scores.gather(1, perm)
                self.pending[index] = None
            if positions.shape[1] == self.budget + 1:
                old = positions <= self.position - self.recent
                ranked = torch.where(old, scores, torch.finfo(scores.dtype).max)
                evict = torch.argmin(ranked, dim=1)  # first index on ties
                evicted[index] = positions.gather(1, evict[:, None])[:, 0]
                live = torch.ones_like(positions, dtype=torch.bool)
                live[torch.arange(kv), evict] = False
                keep = torch.arange(positions.shape[1]).expand(kv, -1)[live].reshape(kv, -1)
                gather_entries(layer, keep)
                positions, scores = positions.gather(1, keep), scores.gather(1, keep)
                self.pending[index] = evict
            self.positions[index], self.scores[index], self.steps[index] = positions, scores, None
        self.evicted.append(evicted)
        self.position += 1

    def evictions(self) -> torch.Tensor:
        """``[layers, kv_heads, steps]``: the position each step evicted (-1: the cache was not full yet)."""
        if not self.evicted:
            return torch.zeros((len(self.scores), self.positions[0].shape[0], 0), dtype=torch.long)
        return torch.stack(self.evicted, -1)

    @staticmethod
    def _insert(slot: int, length: int) -> list[int]:
        """Entry order that moves the last of ``length`` entries to index ``slot``."""
        rest = list(range(length - 1))
        return [*rest[:slot], length - 1, *rest[slot:]]


@reference_face(H2O)
@torch.no_grad()
def h2o_generate(model, inputs: dict, method: H2O, new_tokens: int) -> H2OResult:
    """H2O greedy generation for processor ``inputs`` (batch 1) on a LLaVA(-NeXT)."""
    done = compressed_prefill(model, inputs, method)
    state = HeavyHitters(done.cache, done.positions, list(done.scores.gather(2, done.positions)), method, done.length)
    with eager_attention(model):
        ids = evicting_greedy(model, done.logits, state, new_tokens)
    retained = torch.stack([p.sort(dim=1).values for p in state.positions])
    return H2OResult(done.positions, retained, done.logits, ids)


def evicting_greedy(model, logits: torch.Tensor, state: HeavyHitters, new_tokens: int) -> list[int]:
    """Greedy decoding from prefill ``logits`` with ``state`` capturing every layer's step attention (a forward
    hook on its attention module) and evicting before each step and after the last."""
    layers = model.model.language_model.layers
    hooks = [layer.self_attn.register_forward_hook(state.capture(i)) for i, layer in enumerate(layers)]
    try:
        ids = greedy(model, logits, state.cache, state.position, new_tokens, evict=state.update)
    finally:
        for hook in hooks:
            hook.remove()
    state.update()  # the last step's eviction
    return ids
