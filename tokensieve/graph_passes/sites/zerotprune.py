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
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.sites.common import (
    SiteInput,
    SiteOutput,
    attention_probs,
    gather_tokens,
    key_metric,
    one_hot,
)
from tokensieve.methods.faces import register
from tokensieve.methods.zerotprune import ZeroTPrune


def _scalar(b: NodeBuilder, value: float, dtype: ir.DataType, hint: str) -> ir.Value:
    np_dtype = dtype.numpy()
    return b.const(np.array(value, dtype=np_dtype), hint, dtype=np_dtype)


def head_importance(b: NodeBuilder, site: SiteInput, iterations: int) -> ir.Value:
    """``[B, H, N]``: weighted PageRank of every head's attention graph after ``iterations`` steps."""
    probs = attention_probs(b, site)
    s = b.reduce("ReduceMean", probs, [2], keepdims=True)  # A^T (1/N): [B, H, 1, N]
    for _ in range(iterations - 1):
        s = b.op("MatMul", [s, probs], "power_iteration")
    return b.op("Squeeze", [s, b.const([2], "axes")])


def head_weights(
    b: NodeBuilder, s: ir.Value, tokens: int, bounds: tuple[float, float], dtype: ir.DataType
) -> ir.Value:
    """``[B, H, 1]`` 1 for the heads whose variance of ``N·s`` lies in ``bounds`` (every head when none does)."""
    x = b.op("Mul", [s, _scalar(b, float(tokens), dtype, "tokens")])
    centred = b.op("Sub", [x, b.reduce("ReduceMean", x, [2], keepdims=True)])
    variance = b.reduce("ReduceMean", b.op("Mul", [centred, centred]), [2], keepdims=True)
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


def importance(b: NodeBuilder, site: SiteInput) -> ir.Value:
    """``[B, N]``: the heads' importance combined (filtered heads, root mean square or mean)."""
    method: ZeroTPrune = site.method
    s = head_importance(b, site, site.count.params["iterations"])
    values = b.op("Mul", [s, s]) if method.eir else s
    if method.head_filter is None:
        combined = b.reduce("ReduceMean", values, [1], keepdims=False)
    else:
        weights = head_weights(b, s, site.count.tokens_in, method.head_filter, site.stream.dtype)
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
    return SiteOutput(out, sizes_out, dict(b.exposed), kept if site.positions else None)
