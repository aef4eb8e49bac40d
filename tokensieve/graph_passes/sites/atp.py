"""ATP decision and bucket selection (:class:`tokensieve.methods.ATPPrune`), the two halves of an adaptive site.

:func:`emit_decision` (stage 1, at the site): the CLS-row attention over the ``n`` candidates recomputed from Q and
K (without a CLS token: the attention each candidate receives, mean over the valid query rows and the heads),
renormalised; the keep rule (``n·s > threshold``, or the smallest set reaching ``mass``: ``TopK`` as a sort,
``CumSum``, the value of the last needed rank as a threshold), united with the constant SAP grid at the first
site and restricted to valid slots at later ones. Outputs ``order_key = 4·kept + priority`` (``priority`` = score,
+2 on the grid: kept tokens first, then by priority; ``[B, n]``) and ``count`` (``[B]``). No data-dependent shape.

:func:`emit_selection` (stage 2, at the same site, specialised to a bucket of ``K`` slots or with a symbolic K read
from the shape of the ``valid`` input): ``TopK(order_key, K)`` picks the kept tokens (the highest-priority ones when a
bucket truncates), a second ``TopK`` on ``2^21·valid + (2^20 - 1 - index)`` puts the valid slots first in
original order, then fillers; ``GatherND`` builds ``[specials, slots]``. Returns the validity of every token
(``[B, S + K]``) for the key bias and pooling weights, and exposes the kept positions.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.sites.common import SiteInput, gather_tokens, head_mean_scores
from tokensieve.methods.atp import ATPPrune
from tokensieve.methods.faces import register

GRID_BOOST = 2.0  # priority bonus of grid tokens (scores are <= 1)
KEPT_WEIGHT = 4.0  # order_key weight of the keep flag (above any priority)


@register("site_decision", ATPPrune)
def emit_decision(
    b: NodeBuilder, site: SiteInput, first_site: bool, valid: ir.Value | None
) -> tuple[ir.Value, ir.Value]:
    """-> (``order_key [B, n]``, ``count [B]``). Works for a static or a symbolic number of candidates."""
    method, S = site.method, site.specials
    dtype = site.stream.dtype
    np_dtype = dtype.numpy()

    def const(value, hint):
        return b.const(np.array(value, dtype=np_dtype), hint, dtype=np_dtype)

    s = normalized_candidates(b, head_mean_scores(b, site, method.resolved_score(S), valid), S)
    candidate_valid = b.slice(valid, S, 2**62, axis=1) if valid is not None else None
    if method.threshold is not None:
        kept = above_threshold(b, s, candidate_valid, method.threshold, dtype)
    else:
        n = b.slice(b.op("Shape", [s]), 1, 2, axis=0)  # [1] int64
        ranked, _ = b.op("TopK", [s, n], "sort", num_outputs=2, axis=-1, largest=1, sorted=1)
        before = b.op("Sub", [b.op("CumSum", [ranked, b.const(np.array(1), "axis")]), ranked])
        below = b.op("Less", [before, const(method.mass, "mass")])
        needed = b.reduce("ReduceSum", b.op("Cast", [below], to=ir.DataType.INT64), [1], keepdims=True)  # [B, 1]
        last = b.op("GatherElements", [ranked, b.op("Sub", [needed, b.const(np.array([[1]]), "one")])], axis=1)
        kept = b.op("GreaterOrEqual", [s, last])
    priority = s
    grid = method.grid_positions(site.count.candidates) if first_site else []
    if grid:
        mask = np.zeros(site.count.candidates, dtype=bool)
        mask[grid] = True
        kept = b.op("Or", [kept, b.const(mask, "grid", dtype=bool)])
        priority = b.op("Add", [s, b.const(mask.astype(np_dtype) * GRID_BOOST, "grid_boost", dtype=np_dtype)])
    if candidate_valid is not None:  # later sites: padding slots of the previous bucket are never kept
        kept = b.op("And", [kept, candidate_valid])
    return decision_outputs(b, kept, priority, dtype)


def normalized_candidates(b: NodeBuilder, scores: ir.Value, specials: int) -> ir.Value:
    """``[B, n]``: the candidates' scores (``scores [B, N]`` past the specials) renormalised to sum to 1."""
    s = b.slice(scores, specials, 2**62, axis=1)
    return b.op("Div", [s, b.reduce("ReduceSum", s, [1], keepdims=True)], "normalized")


def above_threshold(
    b: NodeBuilder, s: ir.Value, candidate_valid: ir.Value | None, threshold: float, dtype: ir.DataType
) -> ir.Value:
    """``[B, n]`` bool: ``n·s > threshold``, ``n`` the real candidates (padding slots of a previous bucket, whose
    score is 0, are not candidates)."""
    n_real = (
        b.reduce("ReduceSum", b.op("Cast", [candidate_valid], to=dtype), [1], keepdims=True)
        if candidate_valid is not None
        else b.op("Cast", [b.slice(b.op("Shape", [s]), 1, 2, axis=0)], to=dtype)
    )
    np_dtype = dtype.numpy()
    limit = b.const(np.array(threshold, dtype=np_dtype), "threshold", dtype=np_dtype)
    return b.op("Greater", [b.op("Mul", [s, n_real]), limit])


def decision_outputs(b: NodeBuilder, kept: ir.Value, priority: ir.Value, dtype: ir.DataType):
    """-> (``order_key = KEPT_WEIGHT·kept + priority`` exposed as ``order_key``, ``count [B]`` exposed as ``count``)."""
    np_dtype = dtype.numpy()
    weight = b.const(np.array(KEPT_WEIGHT, dtype=np_dtype), "kept_weight", dtype=np_dtype)
    flag = b.op("Mul", [b.op("Cast", [kept], to=dtype), weight])
    order_key = b.expose(b.op("Add", [flag, priority]), "order_key")
    count = b.expose(b.reduce("ReduceSum", b.op("Cast", [kept], to=ir.DataType.INT64), [1], keepdims=False), "count")
    return order_key, count


def valid_slots(b: NodeBuilder, count: ir.Value, slots: int) -> ir.Value:
    """``[B, slots]`` bool: slot j holds a kept token iff ``j < count`` (in-graph, for pad-to-max)."""
    return b.op("Less", [b.const(np.arange(slots)[None, :], "slots"), b.unsqueeze(count, [1])])


_POSITION_LIMIT = 1 << 20  # more candidates than any ViT has; orders valid slots before fillers


def emit_selection(
    b: NodeBuilder, stream: ir.Value, order_key: ir.Value, valid: ir.Value, specials: int, slots: int | None
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """-> (tokens ``[B, S + K, C]``, validity ``[B, S + K]`` bool, the position in ``stream`` of every non-special
    slot ``[B, K]``: kept tokens, then the fillers of padding slots). ``slots`` None: K = ``valid``'s width."""
    S, n = specials, _POSITION_LIMIT
    k = b.const([slots], "k") if slots is not None else b.slice(b.op("Shape", [valid]), 1, 2, axis=0)
    _, picked = b.op("TopK", [order_key, k], "pick", num_outputs=2, axis=-1, largest=1, sorted=1)  # [B, K]
    key = b.op(
        "Add",
        [
            b.op("Mul", [b.op("Cast", [valid], to=ir.DataType.INT64), b.const(np.array(2 * n), "2n")]),
            b.op("Sub", [b.const(np.array(n - 1), "n_1"), picked]),
        ],
    )
    _, order = b.op("TopK", [key, k], "valid_first", num_outputs=2, axis=-1, largest=1, sorted=1)
    positions = b.op("GatherElements", [picked, order], axis=1)
    if S:
        positions = b.op("Add", [positions, b.const(np.array(S), "offset")])
    b.expose(positions, "kept")
    parts = [b.slice(stream, 0, S, axis=1)] if S else []
    parts.append(gather_tokens(b, stream, positions))
    tokens = b.op("Concat", parts, "tokens", axis=1)
    slot_valid = b.op("GatherElements", [valid, order], axis=1)
    if S:
        ones = b.op(
            "Expand",
            [
                b.const(np.ones((1, S), dtype=bool), "special_valid", dtype=bool),
                b.op("Concat", [b.slice(b.op("Shape", [valid]), 0, 1, axis=0), b.const([S], "s")], axis=0),
            ],
        )
        slot_valid = b.op("Concat", [ones, slot_valid], axis=1)
    return tokens, slot_valid, positions


def key_bias(b: NodeBuilder, validity: ir.Value, dtype: ir.DataType) -> ir.Value:
    """``[B, 1, 1, N]``: 0 on valid tokens, -1e4 on padding (exactly zero attention in fp32, safe in fp16)."""
    np_dtype = dtype.numpy()
    invalid = b.op(
        "Sub", [b.const(np.array(1, dtype=np_dtype), "one", dtype=np_dtype), b.op("Cast", [validity], to=dtype)]
    )
    scaled = b.op("Mul", [invalid, b.const(np.array(-1e4, dtype=np_dtype), "neg", dtype=np_dtype)])
    return b.unsqueeze(scaled, [1, 2])
