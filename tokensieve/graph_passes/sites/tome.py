"""ToMe site: bipartite soft matching and size-weighted merging (:class:`tokensieve.methods.ToMe`).

Inserts, for ``N`` tokens of which the first ``S`` are special and ``r`` merges:

* metric: head-mean keys, L2-normalised; A = non-special even positions, B = non-special odd positions
  (constant ``Gather``\\ s: protected tokens take no part, exactly as if their rows/columns were -inf);
* ``scores = A·Bᵀ``; ``ReduceMax``/``ArgMax`` per A token; ``TopK(K=|A|)`` as the descending argsort;
  sources = the first ``r``, unmerged = the rest (re-sorted ascending with a second ``TopK`` when ``S > 0``);
* merge: size-weighted mean through a one-hot ``MatMul`` (no scatter); sizes start as ones at the first merge;
* output ``[specials, unmerged A, B]`` and sizes in the same order.

Exposes ``unm``, ``src`` (positions in A) and ``dst`` (positions in B). When later blocks read rotary tables, the
``origin`` of the output is ``[unmerged A positions, B positions]``: a merged group keeps its destination's position.
"""

from __future__ import annotations

from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.sites.common import (
    SiteInput,
    SiteOutput,
    assemble,
    assignment,
    batch_rows,
    bipartite_match,
    gather_tokens,
    key_metric,
    merge_into,
    merge_origin,
    offset_rows,
    ones_sizes,
    specials_placed,
    take,
)
from tokensieve.methods.faces import register
from tokensieve.methods.tome import ToMe


@register("site_emitter", ToMe)
def emit(b: NodeBuilder, site: SiteInput) -> SiteOutput:
    S, N, r = site.specials, site.count.tokens_in, site.count.params["r"]
    h = site.stream
    sizes = site.sizes if site.sizes is not None else ones_sizes(b, h)
    a_pos = [i for i in range(S, N) if i % 2 == 0]
    b_pos = [i for i in range(S, N) if i % 2 == 1]
    metric = key_metric(b, site.block)
    scores = b.op("MatMul", [take(b, metric, a_pos), b.op("Transpose", [take(b, metric, b_pos)], perm=[0, 2, 1])])
    src, unm, dst = bipartite_match(b, scores, r, len(a_pos))
    src, dst = b.expose(src, "src"), b.expose(dst, "dst")
    if S:
        unm, _ = b.op(
            "TopK", [unm, b.const([len(a_pos) - r], "k")], "ascending", num_outputs=2, axis=-1, largest=0, sorted=1
        )
    unm = b.expose(b.op("Identity", [unm]), "unm")
    # A-relative indices -> positions in the stream, so A rows are gathered once, straight from the stream
    a_table = b.const(a_pos, "a_positions")
    src_pos, unm_pos = b.op("Gather", [a_table, src]), b.op("Gather", [a_table, unm])
    merged, merged_sizes = merge_into(
        b,
        take(b, h, b_pos),
        take(b, sizes, b_pos),
        gather_tokens(b, h, src_pos),
        b.op("GatherElements", [sizes, src_pos], axis=1),
        dst,
        len(b_pos),
        h.dtype,
    )
    out = assemble(b, h, sizes, S, unm_pos, merged, merged_sizes)
    out.origin = merge_origin(b, unm_pos, b_pos) if site.positions else None
    if site.restore:  # [specials, unmerged A, B]: merged A tokens go to their destination's place among the B tokens
        kept = S + len(a_pos) - r
        placed = [
            *specials_placed(b, unm_pos, S),
            (unm_pos, offset_rows(b, unm_pos, S, len(a_pos) - r)),
            (batch_rows(b, b_pos, unm_pos), offset_rows(b, unm_pos, kept, len(b_pos))),
            (src_pos, b.op("Add", [dst, b.const(kept, "kept")])),
        ]
        out.assign = assignment(b, placed)
    return out
