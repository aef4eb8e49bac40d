"""Top-k pruning site (EViT-style, :class:`tokensieve.methods.TopKPrune`).

Inserts: the head-mean attention score of every token (CLS query row recomputed from Q and K, or attention
received), ``TopK`` with constant ``K`` over the candidates, a second ``TopK(largest=0)`` restoring ascending
order, ``GatherND`` of the kept rows (and of their sizes when tokens carry sizes), ``Concat[specials, kept]`` and,
with ``fuse``, the fused token ``MatMul(scores of pruned candidates, candidates)`` whose size is the pruned
candidates' total size. Exposes ``kept`` (``[B, K]`` positions in the sequence entering the site). When later
blocks read rotary tables, ``kept`` is also the site's ``origin`` (none with a fused token, which has no position).
"""

from __future__ import annotations

import numpy as np

from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.sites.common import (
    SiteInput,
    SiteOutput,
    gather_tokens,
    head_mean_scores,
    one_hot,
    pruning_placement,
)
from tokensieve.methods.faces import register
from tokensieve.methods.topk import TopKPrune


@register("site_emitter", TopKPrune)
def emit(b: NodeBuilder, site: SiteInput) -> SiteOutput:
    method, count = site.method, site.count
    S, N, n, K = site.specials, count.tokens_in, count.candidates, count.params["kept"]
    h, sizes = site.stream, site.sizes
    scores = head_mean_scores(b, site, method.resolved_score(S))  # [B, N]
    if S:
        scores = b.slice(scores, S, N, axis=1)  # [B, n]
    _, top = b.op("TopK", [scores, b.const([K], "k")], "select", num_outputs=2, axis=-1, largest=1, sorted=1)
    local, _ = b.op("TopK", [top, b.const([K], "k")], "order", num_outputs=2, axis=-1, largest=0, sorted=1)
    kept = b.expose(b.op("Add", [local, b.const(S, "offset")]) if S else b.op("Identity", [local]), "kept")
    parts = [b.slice(h, 0, S, axis=1)] if S else []
    parts.append(gather_tokens(b, h, kept))
    size_parts = []
    if sizes is not None:
        size_parts = [b.slice(sizes, 0, S, axis=1)] if S else []
        size_parts.append(b.op("GatherElements", [sizes, kept], axis=1))
    if method.fused_token(K, n):
        candidates = b.slice(h, S, N, axis=1) if S else h
        kept_mask = b.reduce("ReduceMax", one_hot(b, local, n, h.dtype), [1], keepdims=False)  # [B, n]
        np_dtype = h.dtype.numpy()
        pruned = b.op("Sub", [b.const(np.array(1, dtype=np_dtype), "one", dtype=np_dtype), kept_mask])
        weights = b.op("Mul", [scores, pruned])
        if method.fuse == "mean":
            weights = b.op("Div", [weights, b.reduce("ReduceSum", weights, [1], keepdims=True)])
        parts.append(b.op("MatMul", [b.unsqueeze(weights, [1]), candidates], "fused_token"))  # [B, 1, C]
        if sizes is not None:
            candidate_sizes = b.slice(sizes, S, N, axis=1) if S else sizes
            size_parts.append(b.reduce("ReduceSum", b.op("Mul", [candidate_sizes, pruned]), [1], keepdims=True))
    out = b.op("Concat", parts, "tokens", axis=1)
    sizes_out = b.op("Concat", size_parts, "sizes", axis=1) if sizes is not None else None
    origin = kept if site.positions and not method.fused_token(K, n) else None  # a fused token has no one position
    result = SiteOutput(out, sizes_out, dict(b.exposed), origin)
    if site.restore:
        pruning_placement(b, site, local, result)
    return result
