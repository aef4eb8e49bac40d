"""Eager reference of PiToMe energy-score merging (:class:`tokensieve.methods.PiToMe`), written from the paper and
docs/methods.md#pitome (the official code, CC-BY-NC, is not used), with the official code's BSM variant for the blocks
in ``bsm_layers``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokensieve.methods.faces import register
from tokensieve.methods.pitome import PiToMe
from tokensieve.reference.adapters import AttentionTensors
from tokensieve.reference.merging import argsort_desc, bipartite_match, head_mean_keys, merge_into, placement, rows
from tokensieve.reference.sites import SiteContext, SiteResult


@register("site_reference", PiToMe)
def site(h: torch.Tensor, attention: AttentionTensors, sizes: torch.Tensor | None, ctx: SiteContext) -> SiteResult:
    method, S, r = ctx.method, ctx.specials, ctx.count.params["r"]
    bsm = bool(ctx.count.params.get("bsm"))
    sizes = torch.ones(h.shape[:2], dtype=h.dtype) if sizes is None else sizes
    metric = head_mean_keys(attention.key)[:, S:]
    sim = metric @ metric.transpose(-1, -2)
    margin = method.margin_for(ctx.count.layer, ctx.depth)
    energy = F.elu(sim - margin, alpha=method.alpha).mean(dim=-1)
    order = argsort_desc(energy)
    mergeable = order if bsm else order[:, : 2 * r]  # BSM: every candidate takes part in the matching
    a_idx, b_idx = mergeable[:, 0::2], mergeable[:, 1::2]
    scores = rows(metric, a_idx) @ rows(metric, b_idx).transpose(-1, -2)
    if bsm:
        src, unm, dst = bipartite_match(scores, r)
        selections = {"order": order, "unm": unm, "src": src, "dst": dst}
        protected, a_idx = a_idx.gather(1, unm), a_idx.gather(1, src)
    else:
        dst = scores.argmax(dim=-1)
        selections = {"order": order, "dst": dst}
        protected = order[:, 2 * r :]
    x, s = h[:, S:], sizes[:, S:]
    merged, merged_sizes = merge_into(rows(x, b_idx), rows(s, b_idx), rows(x, a_idx), rows(s, a_idx), dst)
    stream = torch.cat([h[:, :S], rows(x, protected), merged], dim=1)
    new_sizes = torch.cat([sizes[:, :S], rows(s, protected), merged_sizes], dim=1)
    result = SiteResult(stream, new_sizes, selections)
    kept = S + protected.shape[1]  # [specials, protected, B]: a merging A token goes where its destination goes
    placed = [(protected + S, S + torch.arange(protected.shape[1])), (b_idx + S, kept + torch.arange(b_idx.shape[1]))]
    result.assign = placement(h.shape[0], h.shape[1], [*placed, (a_idx + S, kept + dst)])
    return result
