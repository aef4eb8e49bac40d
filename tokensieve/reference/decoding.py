"""Eager prefill and greedy decoding on a Hugging Face LLaVA(-NeXT) language model, layer by layer, with a
``transformers.DynamicCache`` (each layer its own length): the loop the MLLM references share.

The decoder layers are the model's own; what a method changes is which positions prefill keeps per layer
(``select``; :func:`cut_generate` decides from the attention of the layer before each cut) and what the cache holds
before each step (``evict``).

The loop names positions by their index in the sequence. A model whose rotary positions are not that index (mRoPE:
three rows per position, an image's tokens at their grid coordinates, text after it shifted by the rope delta) runs
inside :func:`sequence_rope`, which makes its rotary embedding look the index up in the model's own position table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tokensieve.methods.faces import register


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


class _TableRotary(nn.Module):
    """A rotary embedding called with sequence indices ``[1, T']`` that rotates at the columns of ``table [rows,
    T]`` (indices from ``T`` on: ``index + delta`` on every row); position ids of the model's own shape
    ``[rows, B, T]`` pass through."""

    def __init__(self, rotary: nn.Module, table: torch.Tensor, delta: int):
        super().__init__()
        self.rotary, self.table, self.delta = rotary, table, delta

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if position_ids.dim() == 3:
            return self.rotary(x, position_ids)
        index = position_ids[0]
        inside = self.table[:, index.clamp(max=self.table.shape[1] - 1)]
        after = (index + self.delta).expand(self.table.shape[0], -1)
        return self.rotary(x, torch.where(index < self.table.shape[1], inside, after)[:, None])


@contextmanager
def sequence_rope(model, inputs: dict) -> Iterator[None]:
    """Inside the block, ``model``'s rotary embedding called with sequence indices rotates at the positions the
    model itself gives processor ``inputs`` (its ``get_rope_index``: Qwen-VL's mRoPE); models without one are left
    as they are."""
    rope_index = getattr(model.model, "get_rope_index", None)
    if rope_index is None:
        yield
        return
    names = inspect.signature(rope_index).parameters
    table, delta = rope_index(**{k: v for k, v in inputs.items() if k in names})
    lm = model.model.language_model
    original = lm.rotary_emb
    lm.rotary_emb = _TableRotary(original, table[:, 0], int(delta.reshape(-1)[0]))
    try:
        yield
    finally:
        lm.rotary_emb = original


@torch.no_grad()
def attention_forward(model, inputs: dict):
    """One unreduced forward of processor ``inputs`` with every layer's attention probabilities (``attentions``,
    ``[1, H, T, T]`` each) and the merged input embeddings (``hidden_states[0]``)."""
    with eager_attention(model):
        return model(**inputs, output_attentions=True, output_hidden_states=True)


@torch.no_grad()
def prefill(
    model,
    embeds: torch.Tensor,
    cache,
    select: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Last-position logits ``[V]`` of ``embeds [1, T, D]``. Before each layer ``index``, ``select(index,
    positions)`` may return the prompt positions to keep (a subset of the ``positions [T']`` present, ascending):
    the stream and the position ids are gathered there (FastV, ATP-LLaVA, DyVTE), or, ``contiguous`` (MustDrop),
    the position ids become ``0..T''-1``. Keys/values go to ``cache``."""
    lm = model.model.language_model
    hidden, positions = embeds, torch.arange(embeds.shape[1])
    for index, layer in enumerate(lm.layers):
        keep = None if select is None else select(index, positions)
        if keep is not None:
            hidden, positions = hidden[:, torch.searchsorted(positions, keep)], keep
        ids = (torch.arange(len(positions)) if contiguous else positions)[None]
        hidden = layer(
            hidden,
            attention_mask=causal_mask(hidden.shape[1]),
            position_ids=ids,
            cache=cache,
            position_embeddings=lm.rotary_emb(hidden, ids),
        )
    return model.lm_head(lm.norm(hidden[:, -1]))[0]


@torch.no_grad()
def greedy(
    model,
    logits: torch.Tensor,
    cache,
    start: int,
    new_tokens: int,
    evict: Callable[[], None] | None = None,
    shift: Sequence[tuple[int, int]] = (),
) -> list[int]:
    """``new_tokens`` greedy tokens after prefill ``logits``; token ``i`` is fed at absolute position ``start + i``
    (``shift``, pairs ``(first, dropped)`` by ascending ``first``: layers from ``first`` on at ``start + i - dropped``,
    the last pair that applies; MustDrop, SparseVLM) and attends to everything in ``cache`` (after ``evict()``, when
    given)."""
    lm = model.model.language_model
    offsets = [0] * len(lm.layers)
    for first, dropped in shift:
        offsets[first:] = [dropped] * (len(offsets) - first)
    new: list[int] = []
    for position in range(start, start + new_tokens):
        token = int(torch.argmax(logits))
        new.append(token)
        if len(new) == new_tokens:
            break
        if evict is not None:
            evict()
        hidden = lm.embed_tokens(torch.tensor([[token]]))
        ids = {d: torch.tensor([[position - d]]) for d in offsets}
        rope = {d: (at, lm.rotary_emb(hidden, at)) for d, at in ids.items()}
        for layer, offset in zip(lm.layers, offsets, strict=True):
            at, embeddings = rope[offset]
            hidden = layer(hidden, position_ids=at, cache=cache, position_embeddings=embeddings)
        logits = model.lm_head(lm.norm(hidden[:, -1]))[0]
    return new


@dataclass
class CutResult:
    """An eager generation with decisions before chosen decoder layers (ATP-LLaVA, DyVTE; MustDrop has its own
    result with the vision choices)."""

    cut_positions: list[torch.Tensor]  # the prompt positions each cut keeps, ascending
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens

    @property
    def kept_positions(self) -> torch.Tensor:
        return self.cut_positions[-1]


@torch.no_grad()
def cut_prefill(
    model,
    embeds: torch.Tensor,
    image: torch.Tensor,
    cuts: tuple[int, ...],
    decide: Callable[[dict, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cache,
    contiguous: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill of ``embeds [1, T, D]`` (``image``: the image's positions) with a decision before each decoder layer
    in ``cuts``: ``decide(record, positions, present, image)`` gets layer ``k - 1``'s recorded attention (query,
    key, scaling, probabilities on the tokens present, :func:`tokensieve.reference.capture.capture_attention`), the
    prompt positions present, the image positions among them and the image's positions in the prompt, and returns
    the positions to keep. Returns the last-position logits and the positions each cut kept."""
    from tokensieve.reference.capture import capture_attention

    layers = model.model.language_model.layers
    scorers = {k: layers[k - 1].self_attn for k in cuts}
    kept: list[torch.Tensor] = []

    def select(index: int, positions: torch.Tensor) -> torch.Tensor | None:
        if index not in scorers:
            return None
        kept.append(decide(records[scorers[index]], positions, positions[torch.isin(positions, image)], image))
        return kept[-1]

    with capture_attention(model, scorers.values()) as records:
        logits = prefill(model, embeds, cache, select, contiguous)
    return logits, kept


@torch.no_grad()
def cut_generate(
    model,
    inputs: dict,
    cuts: tuple[int, ...],
    decide: Callable[[dict, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    new_tokens: int,
) -> CutResult:
    """Greedy generation for processor ``inputs`` (batch 1) with a decision before each decoder layer in ``cuts``
    (:func:`cut_prefill`), then decoding at absolute positions."""
    from transformers import DynamicCache

    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id)[:, 0]
    embeds = attention_forward(model, inputs).hidden_states[0]
    cache = DynamicCache()
    logits, kept = cut_prefill(model, embeds, image, cuts, decide, cache)
    return CutResult(kept, logits, greedy(model, logits, cache, len(ids), new_tokens))


def reference_face(cls: type) -> Callable[[Callable], Callable]:
    """Decorator: ``generate(model, inputs, method, new_tokens)`` is ``cls``'s eager reference (the ``"reference"``
    face parity calls as ``face(model, inputs, method, new_tokens, capacity)``; the capacity is not needed)."""

    def decorate(generate: Callable) -> Callable:
        def face(model, inputs: dict, method, new_tokens: int, capacity: int):
            return generate(model, inputs, method, new_tokens)

        register("reference", cls)(face)
        return generate

    return decorate
