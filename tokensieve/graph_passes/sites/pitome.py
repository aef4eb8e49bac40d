"""PiToMe site: energy-score merging (:class:`tokensieve.methods.PiToMe`).

Inserts, over the ``T`` non-special tokens: head-mean keys, L2-normalised; ``sim = m·mᵀ``;
``energy = ReduceMean(Elu(sim - margin, alpha))``; ``TopK(K=T)`` as the descending argsort. PiToMe rule: the first
``2r`` ranks are mergeable (A = even ranks, B = odd ranks, strided ``Slice``), the rest protected; ``ArgMax`` of
``A·Bᵀ`` gives each A token's destination. BSM blocks (``bsm_layers``): A and B alternate over the whole order and
bipartite soft matching picks the ``r`` merging A tokens; the unmerged A tokens are the protected ones. Either way a
size-weighted merge through a one-hot ``MatMul``; output ``[specials, protected, B]``. Exposes ``order`` (the energy
argsort) and ``dst`` (positions in B), and for BSM blocks ``unm`` and ``src`` (positions in A).
"""

from __future__ import annotations

import numpy as np

from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.sites.common import (
    SiteInput,
    SiteOutput,
    assemble,
    assignment,
    bipartite_match,
    gather_tokens,
    key_metric,
    merge_into,
    offset_rows,
    ones_sizes,
    specials_placed,
)
from tokensieve.methods.faces import register
from tokensieve.methods.pitome import PiToMe


@register("site_emitter", PiToMe)
def emit(b: NodeBuilder, site: SiteInput) -> SiteOutput:
    method = site.method
    S, N, T, r = site.specials, site.count.tokens_in, site.count.candidates, site.count.params["r"]
    bsm = bool(site.count.params.get("bsm"))
    h = site.stream
    sizes = site.sizes if site.sizes is not None else ones_sizes(b, h)
    metric = key_metric(b, site.block)
    if S:
        metric = b.slice(metric, S, N, axis=1)
    sim = b.op("MatMul", [metric, b.op("Transpose", [metric], perm=[0, 2, 1])])  # [B, T, T]
    np_dtype = h.dtype.numpy()
    margin_value = np.array(method.margin_for(site.count.layer, site.depth), dtype=np_dtype)
    margin = b.const(margin_value, "margin", dtype=np_dtype)
    energy = b.reduce("ReduceMean", b.op("Elu", [b.op("Sub", [sim, margin])], alpha=method.alpha), [-1], False)
    _, order = b.op("TopK", [energy, b.const([T], "k")], "argsort", num_outputs=2, axis=-1, largest=1, sorted=1)
    order = b.expose(b.op("Identity", [order]), "order")
    end, step = b.const([T if bsm else 2 * r], "end"), b.const([2], "step")
    a_idx = b.op("Slice", [order, b.const([0], "start"), end, b.const([1], "axis"), step])
    b_idx = b.op("Slice", [order, b.const([1], "start"), end, b.const([1], "axis"), step])
    scores = b.op(
        "MatMul",
        [gather_tokens(b, metric, a_idx), b.op("Transpose", [gather_tokens(b, metric, b_idx)], perm=[0, 2, 1])],
    )
    if bsm:
        src, unm, dst = bipartite_match(b, scores, r, (T + 1) // 2)
        src, unm = b.expose(src, "src"), b.expose(b.op("Identity", [unm]), "unm")
        protected = b.op("GatherElements", [a_idx, unm], axis=1)
        a_idx = b.op("GatherElements", [a_idx, src], axis=1)
    else:
        dst = b.op("ArgMax", [scores], axis=-1, keepdims=0)
        protected = b.slice(order, 2 * r, T, axis=1)
    dst = b.expose(dst, "dst")  # [B, r]
    # candidate indices -> stream positions: rows are gathered straight from the stream
    a_pos, b_pos, p_pos = (b.op("Add", [i, b.const(S, "offset")]) if S else i for i in (a_idx, b_idx, protected))
    merged, merged_sizes = merge_into(
        b,
        gather_tokens(b, h, b_pos),
        b.op("GatherElements", [sizes, b_pos], axis=1),
        gather_tokens(b, h, a_pos),
        b.op("GatherElements", [sizes, a_pos], axis=1),
        dst,
        T // 2 if bsm else r,
        h.dtype,
    )
    out = assemble(b, h, sizes, S, p_pos, merged, merged_sizes)
    if site.restore:  # [specials, protected, B]: a merging A token goes where its destination goes
        kept, destinations = S + (((T + 1) // 2 - r) if bsm else T - 2 * r), T // 2 if bsm else r
        placed = [(p_pos, offset_rows(b, p_pos, S, kept - S)), (b_pos, offset_rows(b, p_pos, kept, destinations))]
        out.assign = assignment(b, [*specials_placed(b, p_pos, S), *placed, (a_pos, b.op("Add", [dst, b.const(kept)]))])
    return out
