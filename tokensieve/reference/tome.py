"""Eager reference of ToMe bipartite soft matching (:class:`tokensieve.methods.ToMe`), written from the paper and
docs/methods.md#tome (the official code is CC-BY-NC and is not used). Register and distillation tokens are protected
like the CLS token, and LayerScale is the block's own (the official patch drops both)."""

from __future__ import annotations

import torch

from tokensieve.methods.faces import register
from tokensieve.methods.tome import ToMe
from tokensieve.reference.adapters import AttentionTensors
from tokensieve.reference.merging import bipartite_match, head_mean_keys, merge_into, placement, rows
from tokensieve.reference.sites import SiteContext, SiteResult


@register("site_reference", ToMe)
def site(h: torch.Tensor, attention: AttentionTensors, sizes: torch.Tensor | None, ctx: SiteContext) -> SiteResult:
    S, N, r = ctx.specials, h.shape[1], ctx.count.params["r"]
    sizes = torch.ones(h.shape[:2], dtype=h.dtype) if sizes is None else sizes
    a_pos = torch.tensor([i for i in range(S, N) if i % 2 == 0])
    b_pos = torch.tensor([i for i in range(S, N) if i % 2 == 1])
    metric = head_mean_keys(attention.key)
    src, unm, dst = bipartite_match(metric[:, a_pos] @ metric[:, b_pos].transpose(-1, -2), r)
    if S:
        unm = unm.sort(dim=-1).values
    xa, xb, sa, sb = h[:, a_pos], h[:, b_pos], sizes[:, a_pos], sizes[:, b_pos]
    merged, merged_sizes = merge_into(xb, sb, rows(xa, src), rows(sa, src), dst)
    stream = torch.cat([h[:, :S], rows(xa, unm), merged], dim=1)
    new_sizes = torch.cat([sizes[:, :S], rows(sa, unm), merged_sizes], dim=1)
    # every merged group keeps the position of its destination (a B token), unmerged A tokens their own
    origin = torch.cat([a_pos[unm], b_pos.expand(h.shape[0], -1)], dim=1)
    result = SiteResult(stream, new_sizes, {"unm": unm, "src": src, "dst": dst}, origin)
    kept = S + unm.shape[1]  # a merged token goes where its destination goes
    placed = [
        (a_pos[unm], S + torch.arange(unm.shape[1])),
        (b_pos.repeat(h.shape[0], 1), kept + torch.arange(len(b_pos))),
        (a_pos[src], kept + dst),
    ]
    result.assign = placement(h.shape[0], N, placed)
    return result
