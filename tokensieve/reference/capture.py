"""Record what Hugging Face's own eager attention computes in chosen layers, for references that score tokens from
a layer's queries, keys or probabilities in the middle of their own layer-by-layer prefill (ATP-LLaVA, DyVTE,
MustDrop)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

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
