"""Eager reference of DiffRate inference (:class:`tokensieve.methods.DiffRate`): prune by CLS attention, then merge
by hidden-state similarity, written from the paper and docs/methods.md#diffrate."""

from __future__ import annotations

import torch

from tokensieve.methods.diffrate import DiffRate
from tokensieve.methods.faces import register
from tokensieve.reference.adapters import AttentionTensors
from tokensieve.reference.merging import argsort_desc, merge_into, normalized, rows
from tokensieve.reference.sites import SiteContext, SiteResult
from tokensieve.reference.topk import score


@register("site_reference", DiffRate)
def site(h: torch.Tensor, attention: AttentionTensors, sizes: torch.Tensor | None, ctx: SiteContext) -> SiteResult:
    S, prune, merge = ctx.specials, ctx.count.params["prune"], ctx.count.params["merge"]
    sizes = torch.ones(h.shape[:2], dtype=h.dtype) if sizes is None else sizes
    order = argsort_desc(score(attention, "cls")[:, S:])
    kept = order[:, : prune - S]
    x = torch.cat([h[:, :S], rows(h[:, S:], kept)], dim=1)
    s = torch.cat([sizes[:, :S], rows(sizes[:, S:], kept)], dim=1)
    if merge == prune:
        return SiteResult(x, s, {"order": order})
    metric = normalized(x)
    sim = metric[:, merge:] @ metric[:, :merge].transpose(-1, -2)
    sim[..., :S] = -torch.inf
    similarity, dst = sim.max(dim=-1)
    merged, merged_sizes = merge_into(
        x[:, :merge], s[:, :merge], x[:, merge:], s[:, merge:] * similarity, dst, unweighted=True
    )
    return SiteResult(merged, merged_sizes, {"order": order, "dst": dst})
