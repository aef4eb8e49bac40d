"""Eager reference of attention-score top-k pruning (:class:`tokensieve.methods.TopKPrune`).

Scoring and selection are two small functions; :func:`site` applies them to the stream of one block. Ties are
broken like ONNX ``TopK``: lower index first (stable sort).
"""

from __future__ import annotations

import torch

from tokensieve.methods.faces import register
from tokensieve.methods.topk import TopKPrune
from tokensieve.reference.adapters import AttentionTensors
from tokensieve.reference.merging import argsort_desc, pruning_placement, rows
from tokensieve.reference.sites import SiteContext, SiteResult


def score(attention: AttentionTensors, kind: str) -> torch.Tensor:
    """Scoring step: ``[B, N]`` head-mean attention of every token as it multiplies V (proportional-attention and
    relative position biases included, after a talking-heads mix): the CLS query row (``cls``) or the attention
    received, averaged over query rows (``mean_received``)."""
    return attention.probs(1 if kind == "cls" else None).mean(dim=(1, 2))


def select(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Selection step: indices of the ``kept`` highest scores (ties: lower index first), in ascending order."""
    return torch.sort(argsort_desc(scores)[:, :kept], dim=-1).values


@register("site_reference", TopKPrune)
def site(h: torch.Tensor, attention: AttentionTensors, sizes: torch.Tensor | None, ctx: SiteContext) -> SiteResult:
    method, S = ctx.method, ctx.specials
    scores = score(attention, method.resolved_score(S))[:, S:]
    candidates = h[:, S:]
    n, k = candidates.shape[1], ctx.count.params["kept"]
    local = select(scores, k)
    parts = [h[:, :S], rows(candidates, local)]
    size_parts = [sizes[:, :S], rows(sizes[:, S:], local)] if sizes is not None else []
    if method.fused_token(k, n):
        pruned = torch.ones_like(scores).scatter(1, local, 0.0)
        weights = scores * pruned
        if method.fuse == "mean":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        parts.append((weights.unsqueeze(-1) * candidates).sum(dim=1, keepdim=True))
        if sizes is not None:
            size_parts.append((sizes[:, S:] * pruned).sum(dim=1, keepdim=True))
    new_sizes = torch.cat(size_parts, dim=1) if sizes is not None else None
    origin = None if method.fused_token(k, n) else local + S  # a fused token has no single position
    result = SiteResult(torch.cat(parts, dim=1), new_sizes, {"kept": local + S}, origin)
    result.assign, result.pruned = pruning_placement(h, local, S)
    return result
