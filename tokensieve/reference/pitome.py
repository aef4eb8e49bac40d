"""Eager reference of PiToMe energy-score merging (:class:`tokensieve.methods.PiToMe`), written from the paper and
METHODS.md §3.2 (the official code is CC-BY-NC and is not used)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.reference.adapters import AttentionTensors
from tokensieve.reference.merging import argsort_desc, head_mean_keys, merge_into, rows
from tokensieve.reference.sites import SiteContext, SiteResult


def site(h: torch.Tensor, attention: AttentionTensors, sizes: torch.Tensor | None, ctx: SiteContext) -> SiteResult:
    method, S, r = ctx.method, ctx.specials, ctx.count.params["r"]
    sizes = torch.ones(h.shape[:2], dtype=h.dtype) if sizes is None else sizes
    metric = head_mean_keys(attention.key)[:, S:]
    sim = metric @ metric.transpose(-1, -2)
    margin = method.margin_for(ctx.count.layer, ctx.depth)
    energy = F.elu(sim - margin, alpha=method.alpha).mean(dim=-1)
    order = argsort_desc(energy)
    a_idx, b_idx, protected = order[:, 0 : 2 * r : 2], order[:, 1 : 2 * r : 2], order[:, 2 * r :]
    dst = (rows(metric, a_idx) @ rows(metric, b_idx).transpose(-1, -2)).argmax(dim=-1)
    x, s = h[:, S:], sizes[:, S:]
    merged, merged_sizes = merge_into(rows(x, b_idx), rows(s, b_idx), rows(x, a_idx), rows(s, a_idx), dst)
    stream = torch.cat([h[:, :S], rows(x, protected), merged], dim=1)
    new_sizes = torch.cat([sizes[:, :S], rows(s, protected), merged_sizes], dim=1)
    return SiteResult(stream, new_sizes, {"order": order, "dst": dst})
