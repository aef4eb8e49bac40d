"""Eager prefill and greedy decoding on a Hugging Face LLaVA(-NeXT) language model, layer by layer, with a
``transformers.DynamicCache`` (each layer its own length): the loop the MLLM references share.

The decoder layers are the model's own; what a method changes is which positions prefill keeps per layer
(``select``) and what the cache holds before each step (``evict``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def causal_mask(length: int) -> torch.Tensor:
    steps = torch.arange(length)
    return torch.where(steps[None, :] > steps[:, None], torch.finfo(torch.float32).min, 0.0)[None, None]


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run ``model`` with eager attention inside the block: the only implementation that returns probabilities."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def attention_forward(model, inputs: dict):
    """One unreduced forward of processor ``inputs`` with every layer's attention probabilities (``attentions``,
    ``[1, H, T, T]`` each) and the merged input embeddings (``hidden_states[0]``)."""
    with eager_attention(model):
        return model(**inputs, output_attentions=True, output_hidden_states=True)


@torch.no_grad()
def prefill(
    model, embeds: torch.Tensor, cache, select: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None
) -> torch.Tensor:
    """Last-position logits ``[V]`` of ``embeds [1, T, D]``. Before each layer ``index``, ``select(index,
    positions)`` may return the prompt positions to keep (a subset of the ``positions [T']`` present, ascending):
    the stream and the position ids are gathered there (FastV, ATP-LLaVA). Keys/values go to ``cache``."""
    lm = model.model.language_model
    hidden, positions = embeds, torch.arange(embeds.shape[1])[None]
    for index, layer in enumerate(lm.layers):
        keep = None if select is None else select(index, positions[0])
        if keep is not None:
            take = torch.searchsorted(positions[0], keep)
            hidden, positions = hidden[:, take], positions[:, take]
        hidden = layer(
            hidden,
            attention_mask=causal_mask(hidden.shape[1]),
            position_ids=positions,
            cache=cache,
            position_embeddings=lm.rotary_emb(hidden, positions),
        )
    return model.lm_head(lm.norm(hidden[:, -1]))[0]


@torch.no_grad()
def greedy(
    model, logits: torch.Tensor, cache, start: int, new_tokens: int, evict: Callable[[], None] | None = None
) -> list[int]:
    """``new_tokens`` greedy tokens after prefill ``logits``; token ``i`` is fed at absolute position ``start + i``
    and attends to everything in ``cache`` (after ``evict()``, when given)."""
    lm = model.model.language_model
    new: list[int] = []
    for position in range(start, start + new_tokens):
        token = int(torch.argmax(logits))
        new.append(token)
        if len(new) == new_tokens:
            break
        if evict is not None:
            evict()
        hidden, positions = lm.embed_tokens(torch.tensor([[token]])), torch.tensor([[position]])
        embeddings = lm.rotary_emb(hidden, positions)
        for layer in lm.layers:
            hidden = layer(hidden, position_ids=positions, cache=cache, position_embeddings=embeddings)
        logits = model.lm_head(lm.norm(hidden[:, -1]))[0]
    return new
