"""Eager PyTorch reference of attention-score top-k pruning (:class:`tokensieve.methods.TopKPrune`).

The ground truth that parity compares exported graphs against. Scoring and selection are two small functions;
:func:`apply_topk` wraps the chosen blocks of a timm or Hugging Face vision model (see :mod:`.adapters`) so that
the whole model runs with pruning and records, per site, the kept positions (indices into the sequence entering
the site, ascending). Ties are broken like ONNX ``TopK``: lower index first (stable sort).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from tokensieve.methods.topk import TopKPrune
from tokensieve.reference.adapters import AttentionTensors, find_blocks, special_tokens, wrap_blocks


def score(attention: AttentionTensors, kind: str) -> torch.Tensor:
    """Scoring step: ``[B, N]`` attention scores of every token of the sequence.

    ``cls``: post-softmax attention of the CLS query row, head mean. ``mean_received``: post-softmax attention
    received, mean over heads and query rows.
    """
    q, k = attention.query, attention.key
    if kind == "cls":
        q = q[:, :, :1]
    probs = torch.softmax((q * attention.scale) @ k.transpose(-2, -1), dim=-1)
    return probs.mean(dim=(1, 2))


def select(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Selection step: indices of the ``kept`` highest scores (ties: lower index first), in ascending order."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :kept]
    return torch.sort(order, dim=-1).values


@dataclass
class TopKRecorder:
    """Kept positions per site from the last forward pass: ``{layer: LongTensor [B, K]}``."""

    kept: dict[int, torch.Tensor] = field(default_factory=dict)


def prune(method: TopKPrune, specials: int, layer: int, recorder: TopKRecorder):
    """The site function for ``layer``: score, select, gather (and fuse) the stream."""

    def site(h: torch.Tensor, attention: AttentionTensors) -> torch.Tensor:
        kind = method.resolved_score(specials)
        scores = score(attention, kind)[:, specials:]
        candidates = h[:, specials:]
        n = candidates.shape[1]
        k = method.kept_count(n)
        local = select(scores, k)
        recorder.kept[layer] = local + specials
        index = local.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        parts = [h[:, :specials], candidates.gather(1, index)]
        if method.fused_token(k, n):
            weights = scores.masked_fill(torch.zeros_like(scores, dtype=torch.bool).scatter(1, local, True), 0.0)
            if method.fuse == "mean":
                weights = weights / weights.sum(dim=-1, keepdim=True)
            parts.append((weights.unsqueeze(-1) * candidates).sum(dim=1, keepdim=True))
        return torch.cat(parts, dim=1)

    return site


class TopKReference(nn.Module):
    """A copy of ``model`` with top-k pruning applied; ``.recorder.kept`` holds the last forward's selections."""

    def __init__(self, model: nn.Module, method: TopKPrune, specials: int | None = None):
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.specials = special_tokens(self.model) if specials is None else specials
        self.method = method
        self.recorder = TopKRecorder()
        depth = len(find_blocks(self.model)[1])
        method.schedule(1 + self.specials, self.specials, depth)  # validates the layer indices
        wrap_blocks(self.model, {i: prune(method, self.specials, i, self.recorder) for i in method.layers})

    def forward(self, *args, **kwargs):
        self.recorder.kept.clear()
        return self.model(*args, **kwargs)


def apply_topk(model: nn.Module, method: TopKPrune, specials: int | None = None) -> TopKReference:
    return TopKReference(model, method, specials)
