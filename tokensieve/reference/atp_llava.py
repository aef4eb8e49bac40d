"""Eager ATP-LLaVA (training-free form) on a Hugging Face LLaVA model: the ground truth the exported graphs are
held to.

Written from the paper (Eq. 3-5) and METHODS.md §4.3 on the model's own modules, independently of the graph passes:

1. prefill runs the decoder layers one by one (:mod:`tokensieve.reference.decoding`) under a registered attention
   function that runs Hugging Face's own eager attention of the model family and records, for the layers before
   each cut, the query and keys after RoPE and the probabilities it computed (on the tokens present at that
   point);
2. before each layer ``k`` of ``layers``: ``S_self`` = the ``[I, I]`` logits ``q . k * scaling`` among the image
   tokens present (keys repeated over each KV group), mean over the keys, mean over heads; ``S_cross`` = the
   probabilities of the rows after the image on the image columns, mean over those rows (0 if none), mean over
   heads; ``S_r = (S_self + S_cross) / 2``; keep ``S_r > threshold`` (absolute, or ``mean + offset * std`` of
   ``S_r`` in float64) or the spatial grid, and every text position; the stream and position ids are gathered;
3. greedy decoding at absolute positions, every layer attending to all of its cached positions.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tokensieve.methods.atp_llava import ATPLLaVA
from tokensieve.reference.decoding import greedy, prefill

CAPTURE = "tokensieve_capture"
_records: dict[Any, dict[str, Any]] = {}  # attention module -> its last query, key, scaling, probabilities


def _capturing_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Hugging Face's own eager attention of ``module``'s model family, recording the operands of watched modules."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    output, weights = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if module in _records:
        _records[module] = {"query": query, "key": key, "scaling": scaling, "probs": weights}
    return output, weights


@contextmanager
def capture_attention(model, modules):
    """Run ``model`` with eager attention that records each of ``modules``' query, key, scaling and probabilities
    (the mapping yielded: module -> record, updated on every call)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(CAPTURE, _capturing_attention)
    # without a mask function of its own, a custom attention gets no mask at all: use eager's causal mask
    AttentionMaskInterface.register(CAPTURE, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    _records.clear()
    _records.update({module: {} for module in modules})
    try:
        yield _records
    finally:
        model.set_attn_implementation(previous)
        _records.clear()


@dataclass
class ATPLLaVAResult:
    cut_positions: list[torch.Tensor]  # the prompt positions each cut keeps, ascending
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens

    @property
    def kept_positions(self) -> torch.Tensor:
        return self.cut_positions[-1]


def atp_scores(record: dict[str, Any], image: torch.Tensor):
    """``(S_self, S_cross)`` of the image tokens at sequence indices ``image`` from one layer's recorded query
    ``[1, H, T, d]``, keys ``[1, H_kv, T, d]`` and probabilities ``[1, H, T, T]``."""
    query, key, probs = record["query"], record["key"], record["probs"]
    keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = query[0][:, image] @ keys[0][:, image].transpose(-1, -2) * record["scaling"]  # [H, I, I]
    self_score = logits.mean(-1).mean(0)
    after = int(image.max()) + 1 if len(image) else 0
    rows = probs[0, :, after:][:, :, image]  # [H, R, I]
    cross = rows.mean(1).mean(0) if rows.shape[1] else torch.zeros(len(image), dtype=probs.dtype)
    return self_score, cross


def atp_keep(self_score, cross_score, present: torch.Tensor, image_tokens: int, method: ATPLLaVA) -> torch.Tensor:
    """Boolean mask over the image tokens ``present`` (indices into the image)."""
    redundancy = (self_score + cross_score) / 2
    if method.threshold is not None:
        threshold = method.threshold
    else:
        wide = redundancy.double()
        threshold = float(wide.mean() + method.offset * wide.std(unbiased=False)) if len(wide) else 0.0
    grid = torch.zeros(image_tokens, dtype=torch.bool)
    grid[method.grid_positions(image_tokens)] = True
    return (redundancy > threshold) | grid[present]


@torch.no_grad()
def atp_llava_generate(model, inputs: dict, method: ATPLLaVA, new_tokens: int) -> ATPLLaVAResult:
    """ATP-LLaVA greedy generation for processor ``inputs`` (batch 1) on a LLaVA ``model``."""
    from transformers import DynamicCache

    from tokensieve.reference.decoding import attention_forward

    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id)[:, 0]  # prompt positions of the image
    embeds = attention_forward(model, inputs).hidden_states[0]
    layers = model.model.language_model.layers
    scorers = {k: layers[k - 1].self_attn for k in method.cuts}
    cuts: list[torch.Tensor] = []

    def select(index: int, positions: torch.Tensor) -> torch.Tensor | None:
        if index not in scorers:
            return None
        present = positions[torch.isin(positions, image)]  # image tokens still in the sequence
        local = torch.searchsorted(positions, present)
        scores = atp_scores(records[scorers[index]], local)
        keep = atp_keep(*scores, present - (image[0] if len(image) else 0), len(image), method)
        kept = torch.sort(torch.cat([positions[~torch.isin(positions, image)], present[keep]])).values
        cuts.append(kept)
        return kept

    cache = DynamicCache()
    with capture_attention(model, scorers.values()) as records:
        logits = prefill(model, embeds, cache, select)
    return ATPLLaVAResult(cuts, logits, greedy(model, logits, cache, len(ids), new_tokens))
