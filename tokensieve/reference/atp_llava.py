"""Eager ATP-LLaVA (training-free form) on a Hugging Face LLaVA model: the ground truth the exported graphs are
held to.

Written from the paper (Eq. 3-5) and METHODS.md §4.3 on the model's own modules, independently of the graph passes:

1. one unreduced forward with eager attention gives layer ``k - 1``'s probabilities (``output_attentions``) and,
   through a registered attention function that records the operands Hugging Face passes to its eager attention,
   that layer's queries and keys after RoPE; nothing changes before layer ``k``, so both are what the method sees;
2. ``S_self``: the ``[I, I]`` image-to-image logits ``q . k * scaling`` (keys repeated over each KV group), mean
   over the keys, mean over heads; ``S_cross``: the probabilities of the rows after the image on the image columns,
   mean over those rows (0 if none), mean over heads; ``S_r = (S_self + S_cross) / 2``;
3. keep ``S_r > threshold`` (absolute, or ``mean + offset * std`` of ``S_r`` in float64) or the spatial grid; every
   text position kept; the decoder layers run one by one with the stream and the position ids gathered before
   layer ``k`` (:mod:`tokensieve.reference.decoding`), then greedy decoding at absolute positions.
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
_captured: dict[str, Any] = {}


def _capturing_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Hugging Face's own eager attention of ``module``'s model family, recording the operands of one module."""
    if module is _captured.get("module"):
        _captured.update(query=query, key=key, scaling=scaling)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@contextmanager
def capture_attention(model, module):
    """Run ``model`` with eager attention that records ``module``'s query, key and scaling into ``_captured``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(CAPTURE, _capturing_attention)
    # without a mask function of its own, a custom attention gets no mask at all: use eager's causal mask
    AttentionMaskInterface.register(CAPTURE, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    _captured.clear()
    _captured["module"] = module
    try:
        yield _captured
    finally:
        model.set_attn_implementation(previous)


@dataclass
class ATPLLaVAResult:
    self_score: torch.Tensor  # [I]
    cross_score: torch.Tensor  # [I]
    kept_positions: torch.Tensor  # [T'] ascending
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens


def atp_scores(query, key, scaling: float, attention: torch.Tensor, image: torch.Tensor):
    """``(S_self, S_cross)`` over the image positions from one layer's queries ``[1, H, T, d]``, keys
    ``[1, H_kv, T, d]`` and probabilities ``[1, H, T, T]``."""
    keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = query[0][:, image] @ keys[0][:, image].transpose(-1, -2) * scaling  # [H, I, I]
    self_score = logits.mean(-1).mean(0)
    after = int(image.max()) + 1 if len(image) else 0
    rows = attention[0, :, after:][:, :, image]  # [H, R, I]
    cross = rows.mean(1).mean(0) if rows.shape[1] else torch.zeros(len(image), dtype=attention.dtype)
    return self_score, cross


def atp_select(self_score, cross_score, image: torch.Tensor, length: int, method: ATPLLaVA) -> torch.Tensor:
    redundancy = (self_score + cross_score) / 2
    if method.threshold is not None:
        threshold = method.threshold
    else:
        wide = redundancy.double()
        threshold = float(wide.mean() + method.offset * wide.std(unbiased=False)) if len(wide) else 0.0
    keep = redundancy > threshold
    keep[method.grid_positions(len(image))] = True
    mask = torch.ones(length, dtype=torch.bool)
    mask[image] = keep
    return torch.nonzero(mask)[:, 0]


@torch.no_grad()
def atp_llava_generate(model, inputs: dict, method: ATPLLaVA, new_tokens: int) -> ATPLLaVAResult:
    """ATP-LLaVA greedy generation for processor ``inputs`` (batch 1) on a LLaVA ``model``."""
    from transformers import DynamicCache

    scorer = model.model.language_model.layers[method.k - 1].self_attn
    with capture_attention(model, scorer) as captured:
        full = model(**inputs, output_attentions=True, output_hidden_states=True)
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id)[:, 0]
    scores = atp_scores(captured["query"], captured["key"], captured["scaling"], full.attentions[method.k - 1], image)
    keep = atp_select(*scores, image, len(ids), method)
    cache = DynamicCache()
    logits = prefill(model, full.hidden_states[0], cache, keep_from=(method.k, keep))
    return ATPLLaVAResult(*scores, keep, logits, greedy(model, logits, cache, len(ids), new_tokens))
