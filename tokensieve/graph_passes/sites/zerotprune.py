"""Zero-TPrune site (:class:`tokensieve.methods.ZeroTPrune`): weighted PageRank importance, similarity and importance
pruning.

Inserts, at the site: the block's post-softmax attention ``A [B, H, N, N]`` (its own ``Softmax``, or recomputed
when the attention is a fused op); the importance ``s [B, H, 1, N]`` as ``ReduceMean(A)`` over the query rows
(one step from the uniform start) followed by ``iterations - 1`` unrolled ``MatMul(s, A)`` (``s <- Aᵀ s``, no
``Loop``); the head filter (variance of ``N·s`` per head, ``GreaterOrEqual``/``LessOrEqual`` against constants, all
heads when none passes) and the head combination (root mean square or mean of the kept heads); the S-stage
(``TopK(K=n)`` as the importance argsort, the less-important half against the rest by ``MatMul`` of L2-normalised
head-mean keys, ``ReduceMax``, ``TopK(K=similar)``); the I-stage (``Where`` lowers the similarity-pruned tokens
below every score, ``TopK(K=kept)``, a second ``TopK(largest=0)`` restoring ascending order) and
``GatherND`` of the kept rows after the special tokens. Exposes ``kept`` (``[B, K]`` positions in the sequence
entering the site), which is also the site's ``origin`` when later blocks read rotary tables. Every ``K`` is a
constant.

The threshold form's decision (``"site_decision"``, stage graphs): the same importance (from a start uniform over
the valid slots when a bucket's padding enters), renormalised over the candidates, ``n·s > threshold``, and ATP's
order key and count.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.sites.atp import above_threshold, decision_outputs, normalized_candidates
from tokensieve.graph_passes.sites.common import (
    SiteInput,
    SiteOutput,
    attention_probs,
    gather_tokens,
    key_metric,
    one_hot,
    pruning_placement,
)
from tokensieve.methods.faces import register
from tokensieve.methods.zerotprune import ZeroTPrune


def _scalar(b: NodeBuilder, value: float, dtype: ir.DataType, hint: str) -> ir.Value:
    np_dtype = dtype.numpy()
    return b.const(np.array(value, dtype=np_dtype), hint, dtype=np_dtype)


def head_importance(b: NodeBuilder, site: SiteInput, iterations: int, start: ir.Value | None) -> ir.Value:
    """``[B, H, N]``: weighted PageRank of every head's attention graph after ``iterations`` steps from the uniform
    start (``start [B, 1, 1, N]``: uniform over the valid tokens only, None: over all)."""
    probs = attention_probs(b, site)
    if start is None:
        s = b.reduce("ReduceMean", probs, [2], keepdims=True)  # A^T (1/N): [B, H, 1, N]
    else:
        s = b.op("MatMul", [start, probs], "power_iteration")
    for _ in range(iterations - 1):
        s = b.op("MatMul", [s, probs], "power_iteration")
    return b.op("Squeeze", [s, b.const([2], "axes")])


def head_weights(
    b: NodeBuilder,
    s: ir.Value,
    bounds: tuple[float, float],
    tokens: ir.Value,
    mask: ir.Value | None,
    dtype: ir.DataType,
) -> ir.Value:
    """``[B, H, 1]`` 1 for the heads whose variance of ``tokens·s`` over the (valid: ``mask [B, 1, N]``) tokens
    lies in ``bounds``; every head when none does."""
    x = b.op("Mul", [s, tokens])
    mean = b.op("Div", [b.reduce("ReduceSum", _masked(b, x, mask), [2], keepdims=True), tokens])
    centred = b.op("Sub", [x, mean])
    squares = _masked(b, b.op("Mul", [centred, centred]), mask)
    variance = b.op("Div", [b.reduce("ReduceSum", squares, [2], keepdims=True), tokens])
    inside = b.op(
        "And",
        [
            b.op("GreaterOrEqual", [variance, _scalar(b, bounds[0], dtype, "low")]),
            b.op("LessOrEqual", [variance, _scalar(b, bounds[1], dtype, "high")]),
        ],
    )
    weights = b.op("Cast", [inside], to=dtype)
    none = b.op("Equal", [b.reduce("ReduceSum", weights, [1], keepdims=True), _scalar(b, 0.0, dtype, "zero")])
    return b.op("Where", [none, _scalar(b, 1.0, dtype, "one"), weights], "head_filter")


def _masked(b: NodeBuilder, x: ir.Value, mask: ir.Value | None) -> ir.Value:
    return x if mask is None else b.op("Mul", [x, mask])


def importance(b: NodeBuilder, site: SiteInput, valid: ir.Value | None = None) -> ir.Value:
    """``[B, N]``: the heads' importance combined (filtered heads, root mean square or mean). ``valid [B, N]``
    (bool, a bucket's padding slots False): the importance the valid tokens alone would have; 0 on padding."""
    method: ZeroTPrune = site.method
    dtype = site.stream.dtype
    mask = start = None
    if valid is None:
        tokens = _scalar(b, float(site.count.tokens_in), dtype, "tokens")
    else:
        mask = b.unsqueeze(b.op("Cast", [valid], to=dtype), [1])  # [B, 1, N]
        tokens = b.reduce("ReduceSum", mask, [2], keepdims=True)  # [B, 1, 1]
        start = b.unsqueeze(b.op("Div", [mask, tokens]), [1])  # [B, 1, 1, N]
    s = head_importance(b, site, method.iterations_at(site.count.layer, site.depth), start)
    values = b.op("Mul", [s, s]) if method.eir else s
    if method.head_filter is None:
        combined = b.reduce("ReduceMean", values, [1], keepdims=False)
    else:
        weights = head_weights(b, s, method.head_filter, tokens, mask, dtype)
        total = b.reduce("ReduceSum", b.op("Mul", [values, weights]), [1], keepdims=False)
        combined = b.op("Div", [total, b.reduce("ReduceSum", weights, [1], keepdims=False)])
    return b.op("Sqrt", [combined], "importance") if method.eir else combined


def similar_pruned(b: NodeBuilder, site: SiteInput, scores: ir.Value) -> ir.Value:
    """``[B, similar]`` candidate positions the S-stage prunes: the less-important group's tokens most similar
    (cosine of head-mean keys) to the important group."""
    S, N, n = site.specials, site.count.tokens_in, site.count.candidates
    group, r = site.count.params["group"], site.count.params["similar"]
    _, order = b.op("TopK", [scores, b.const([n], "k")], "rank", num_outputs=2, axis=-1, largest=1, sorted=1)
    less, more = b.slice(order, n - group, n, axis=1), b.slice(order, 0, n - group, axis=1)
    metric = key_metric(b, site.block)
    if S:
        metric = b.slice(metric, S, N, axis=1)
    similarity = b.op(
        "MatMul",
        [gather_tokens(b, metric, less), b.op("Transpose", [gather_tokens(b, metric, more)], perm=[0, 2, 1])],
        "similarity",
    )
    best = b.reduce("ReduceMax", similarity, [-1], keepdims=False)  # [B, group]
    _, chosen = b.op("TopK", [best, b.const([r], "k")], "most_similar", num_outputs=2, axis=-1, largest=1, sorted=1)
    return b.op("GatherElements", [less, chosen], axis=1)


@register("site_decision", ZeroTPrune)
def emit_decision(
    b: NodeBuilder, site: SiteInput, first_site: bool, valid: ir.Value | None
) -> tuple[ir.Value, ir.Value]:
    """The threshold form (stage graphs): keep the candidates with ``n·s > threshold`` (``s`` the importance
    renormalised over the candidates, ``n`` the real candidates). -> (``order_key [B, n]``, ``count [B]``)."""
    S, dtype = site.specials, site.stream.dtype
    s = normalized_candidates(b, importance(b, site, valid), S)
    candidate_valid = b.slice(valid, S, 2**62, axis=1) if valid is not None else None
    kept = above_threshold(b, s, candidate_valid, site.method.threshold, dtype)
    if candidate_valid is not None:
        kept = b.op("And", [kept, candidate_valid])
    return decision_outputs(b, kept, s, dtype)


@register("site_emitter", ZeroTPrune)
def emit(b: NodeBuilder, site: SiteInput) -> SiteOutput:
    count, S, h, sizes = site.count, site.specials, site.stream, site.sizes
    scores = importance(b, site)
    if S:
        scores = b.slice(scores, S, count.tokens_in, axis=1)  # [B, n]
    if count.params["similar"]:
        pruned = one_hot(b, similar_pruned(b, site, scores), count.candidates, h.dtype)
        gone = b.op("Cast", [b.reduce("ReduceMax", pruned, [1], keepdims=False)], to=ir.DataType.BOOL)
        scores = b.op("Where", [gone, _scalar(b, -1.0, h.dtype, "below"), scores], "survivors")  # scores are >= 0
    K = b.const([count.params["kept"]], "k")
    _, top = b.op("TopK", [scores, K], "select", num_outputs=2, axis=-1, largest=1, sorted=1)
    local, _ = b.op("TopK", [top, K], "order", num_outputs=2, axis=-1, largest=0, sorted=1)
    kept = b.expose(b.op("Add", [local, b.const(S, "offset")]) if S else b.op("Identity", [local]), "kept")
    parts = ([b.slice(h, 0, S, axis=1)] if S else []) + [gather_tokens(b, h, kept)]
    out = b.op("Concat", parts, "tokens", axis=1)
    sizes_out = None
    if sizes is not None:
        size_parts = ([b.slice(sizes, 0, S, axis=1)] if S else []) + [b.op("GatherElements", [sizes, kept], axis=1)]
        sizes_out = b.op("Concat", size_parts, "sizes", axis=1)
    result = SiteOutput(out, sizes_out, dict(b.exposed), kept if site.positions else None)
    if site.restore:
        pruning_placement(b, site, local, result)
    return result
