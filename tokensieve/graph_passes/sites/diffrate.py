"""DiffRate site: prune by CLS attention, then merge, in one block (:class:`tokensieve.methods.DiffRate`).

Inserts: the CLS-row attention (recomputed from Q and K with this block's size bias), head mean, over the
candidates; ``TopK(K=T)`` as the descending sort; the first ``prune - S`` candidates are kept, in score order,
after the specials. When ``merge < prune``: cosine similarity of the kept hidden states, ``[merged rows] x
[first merge columns]`` with the special columns masked to -inf (never destinations); ``ReduceMax``/``ArgMax``;
unweighted mean merge (sum and count through a one-hot ``MatMul``); sizes gain ``size * similarity``.
Output ``[specials, first merge - S kept candidates in score order]``. Exposes ``order`` and ``dst``.
"""

from __future__ import annotations

import numpy as np

from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.sites.common import (
    SiteInput,
    SiteOutput,
    gather_tokens,
    head_mean_scores,
    merge_into,
    normalize,
    ones_sizes,
)
from tokensieve.methods.diffrate import DiffRate
from tokensieve.methods.faces import register


@register("site_emitter", DiffRate)
def emit(b: NodeBuilder, site: SiteInput) -> SiteOutput:
    S, N, T = site.specials, site.count.tokens_in, site.count.candidates
    prune, merge = site.count.params["prune"], site.count.params["merge"]
    h = site.stream
    sizes = site.sizes if site.sizes is not None else ones_sizes(b, h)
    scores = b.slice(head_mean_scores(b, site, "cls"), S, N, axis=1)  # [B, T]
    _, order = b.op("TopK", [scores, b.const([T], "k")], "sort", num_outputs=2, axis=-1, largest=1, sorted=1)
    order = b.expose(b.op("Identity", [order]), "order")
    kept = b.op("Add", [b.slice(order, 0, prune - S, axis=1), b.const(S, "offset")])  # stream positions
    x = b.op("Concat", [b.slice(h, 0, S, axis=1), gather_tokens(b, h, kept)], axis=1)
    s = b.op("Concat", [b.slice(sizes, 0, S, axis=1), b.op("GatherElements", [sizes, kept], axis=1)], axis=1)
    if merge == prune:
        return SiteOutput(x, s, dict(b.exposed))
    metric = normalize(b, x)
    sim = b.op(
        "MatMul",
        [b.slice(metric, merge, prune, axis=1), b.op("Transpose", [b.slice(metric, 0, merge, axis=1)], perm=[0, 2, 1])],
    )
    np_dtype = h.dtype.numpy()
    mask = np.zeros(merge, dtype=np_dtype)
    mask[:S] = -np.inf
    sim = b.op("Add", [sim, b.const(mask, "special_columns", dtype=np_dtype)])
    similarity = b.reduce("ReduceMax", sim, [-1], keepdims=False)  # [B, prune - merge]
    dst = b.expose(b.op("ArgMax", [sim], axis=-1, keepdims=0), "dst")
    src_sizes = b.op("Mul", [b.slice(s, merge, prune, axis=1), similarity])
    merged, merged_sizes = merge_into(
        b,
        b.slice(x, 0, merge, axis=1),
        b.slice(s, 0, merge, axis=1),
        b.slice(x, merge, prune, axis=1),
        src_sizes,
        dst,
        merge,
        h.dtype,
        unweighted=True,
    )
    return SiteOutput(merged, merged_sizes, dict(b.exposed))
