"""Building blocks shared by the site emitters: attention rows, key metrics, token gathers, merges.

Everything here emits ONNX ops TensorRT parses with static shapes: constant-K ``TopK``, ``GatherND`` /
``GatherElements``, merges as one-hot ``MatMul``\\ s (docs/methods.md#static-shapes), never ``ScatterElements`` with a
reduction (which ONNX Runtime rejects, TensorRT handles only through a plugin, and the dynamo exporter gets
silently wrong for ``mean``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.locate import AttentionBlock
from tokensieve.methods.base import Method, SiteCount


@dataclass
class SiteInput:
    """What an emitter gets: the located block, the counts, the method and the token state entering the site."""

    block: AttentionBlock
    count: SiteCount
    method: Method
    specials: int
    depth: int
    stream: ir.Value  # [B, N, C], the stream between attention and MLP
    sizes: ir.Value | None  # [B, N] token sizes (number of patches each token stands for), None before any merge
    bias: ir.Value | None  # [B, 1, 1, N] log(sizes) added to this block's attention logits, or None
    positions: bool = False  # later blocks read rotary position tables: say where each output token came from
    restore: bool = False  # the grid is restored downstream: say where every input token goes (``assign``, ``pruned``)


@dataclass
class SiteOutput:
    stream: ir.Value
    sizes: ir.Value | None
    exposed: dict[str, str] = field(default_factory=dict)
    # [B, n_out - S] position, in the stream entering the site, whose rotary rows each non-special output token
    # takes (the kept token; for a merge, the destination). None: not asked for, or the method has none to give.
    origin: ir.Value | None = None
    # [B, N_in] int64 (asked for with ``restore``): for each token entering the site, the output position that holds
    # it, or ``-1 - j`` when it is dropped as row ``j`` of ``pruned``. None: the method gives no such map.
    assign: ir.Value | None = None
    pruned: ir.Value | None = None  # [B, P, C] the dropped tokens' rows of the stream at the site (None: none dropped)
    dropped: int = 0  # P


def row_logits(b: NodeBuilder, site: SiteInput, q_rows: ir.Value, rows: int | None = None) -> ir.Value:
    """Attention logits of some query rows ``[B, H, r, d]`` against all keys, as the block computes them; ``rows``:
    the query rows are the first ``rows`` (None: all), whose rows of a position bias the logits get."""
    block = site.block
    if block.key_transposed:
        logits = b.op("MatMul", [q_rows, block.key], "row_logits")
        biases = dict(block.position_bias)
        for op, data_index in block.logit_ops:
            inputs = list(op.inputs)
            inputs[data_index] = logits
            if op in biases and rows is not None:  # [..., N, N] -> its first rows
                inputs[biases[op]] = b.slice(inputs[biases[op]], 0, rows, axis=-2)
            attributes = {k: a.value for k, a in op.attributes.items()}
            logits = b.op(op.op_type, inputs, f"row_{op.op_type.lower()}", **attributes)
    else:
        scale = block.scale if block.scale is not None else block.head_dim**-0.5
        np_dtype = block.query.dtype.numpy()
        scaled = b.op("Mul", [q_rows, b.const(np.array(scale, dtype=np_dtype), "scale", dtype=np_dtype)])
        logits = b.op("MatMul", [scaled, b.op("Transpose", [block.key], perm=[0, 1, 3, 2])], "row_logits")
    return b.op("Add", [logits, site.bias], "row_bias") if site.bias is not None else logits


def replay(b: NodeBuilder, ops: list[tuple[ir.Node, int]], value: ir.Value, prefix: str) -> ir.Value:
    """``ops`` (nodes with their data input index) applied in turn to ``value`` instead of their data input."""
    for op, data_index in ops:
        inputs = list(op.inputs)
        inputs[data_index] = value
        attributes = {k: a.value for k, a in op.attributes.items()}
        value = b.op(op.op_type, inputs, f"{prefix}_{op.op_type.lower()}", **attributes)
    return value


def attention_probs(b: NodeBuilder, site: SiteInput) -> ir.Value:
    """``[B, H, N, N]`` attention of the block that multiplies V: its own ``Softmax`` output (after a talking-heads
    mix, the mix's output), or recomputed from Q and K when the block uses a fused attention op."""
    return site.block.probs or b.op("Softmax", [row_logits(b, site, site.block.query)], axis=-1)


def row_probs(b: NodeBuilder, site: SiteInput, q_rows: ir.Value, rows: int) -> ir.Value:
    """The attention of the first ``rows`` query rows ``q_rows [B, H, rows, d]`` as the block applies it to V
    (softmax, then the block's talking-heads mix, if any)."""
    probs = b.op("Softmax", [row_logits(b, site, q_rows, rows=rows)], axis=-1)
    return replay(b, site.block.mix_ops, probs, "row_mix")


def head_mean_scores(b: NodeBuilder, site: SiteInput, kind: str, valid: ir.Value | None = None) -> ir.Value:
    """``[B, N]`` post-softmax attention, head mean: the CLS row (``cls``) or received, mean over rows. ``valid
    [B, N]`` (bool, a bucket's padding slots False): the received mean runs over the valid query rows only (the
    padding keys already get no attention from the block's padding bias)."""
    if kind == "cls":
        q_cls = b.slice(site.block.query, 0, 1, axis=2)
        probs = row_probs(b, site, q_cls, 1)
    elif valid is None:
        probs = attention_probs(b, site)
    else:
        rows = b.op("Cast", [valid], to=site.stream.dtype)  # [B, N]
        weights = b.op("Div", [rows, b.reduce("ReduceSum", rows, [1], keepdims=True)])
        probs = b.op("MatMul", [b.unsqueeze(weights, [1, 2]), attention_probs(b, site)], "valid_rows")  # [B,H,1,N]
    return b.reduce("ReduceMean", probs, [1, 2], keepdims=False)


def key_metric(b: NodeBuilder, block: AttentionBlock) -> ir.Value:
    """ToMe's metric: keys averaged over heads, ``[B, N, d]``, L2-normalised per token (a positive scale on the keys,
    like the exporter's ``sqrt(scale)`` folding, does not change it)."""
    keys = b.reduce("ReduceMean", block.key, [1], keepdims=False)  # [B, d, N] or [B, N, d]
    if block.key_transposed:
        keys = b.op("Transpose", [keys], perm=[0, 2, 1])
    return normalize(b, keys)


def normalize(b: NodeBuilder, x: ir.Value) -> ir.Value:
    """``x / ||x||`` over the last axis (no epsilon, like ToMe and DiffRate)."""
    return b.op("Div", [x, b.reduce("ReduceL2", x, [-1], keepdims=True)])


def gather_tokens(b: NodeBuilder, x: ir.Value, index: ir.Value) -> ir.Value:
    """Rows ``index [B, k]`` of ``x [B, N, ...]`` per sample -> ``[B, k, ...]``."""
    return b.op("GatherND", [x, b.unsqueeze(index, [-1])], "gather", batch_dims=1)


def take(b: NodeBuilder, x: ir.Value, positions: list[int]) -> ir.Value:
    """Constant positions along the token axis (axis 1)."""
    return b.op("Gather", [x, b.const(positions, "positions")], axis=1)


def bipartite_match(b: NodeBuilder, scores: ir.Value, r: int, size_a: int) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Bipartite soft matching on ``scores [B, |A|, |B|]`` (``|A| = size_a``): ``ReduceMax``/``ArgMax`` per A
    token, ``TopK(K=|A|)`` as the descending argsort. Returns ``(src, unm, dst)``: the ``r`` merging and the
    unmerged A positions (score order) and the merging tokens' B positions."""
    node_max = b.reduce("ReduceMax", scores, [-1], keepdims=False)  # [B, |A|]
    node_idx = b.op("ArgMax", [scores], axis=-1, keepdims=0)
    _, edges = b.op("TopK", [node_max, b.const([size_a], "k")], "argsort", num_outputs=2, axis=-1, largest=1, sorted=1)
    src = b.slice(edges, 0, r, axis=1)
    return src, b.slice(edges, r, size_a, axis=1), b.op("GatherElements", [node_idx, src], axis=1)


def one_hot(b: NodeBuilder, index: ir.Value, depth: int, dtype: ir.DataType) -> ir.Value:
    """``[B, k] -> [B, k, depth]`` one-hot rows, via ``Equal`` against a constant range (no scatter)."""
    return b.op("Cast", [b.op("Equal", [b.unsqueeze(index, [-1]), b.const(np.arange(depth), "range")])], to=dtype)


def batch_rows(b: NodeBuilder, row: list[int], like: ir.Value) -> ir.Value:
    """The constant ``row`` repeated for every sample of ``like [B, ...]`` -> ``[B, len(row)]`` (int64)."""
    batch = b.op("Slice", [b.op("Shape", [like]), b.const([0], "start"), b.const([1], "end")])
    shape = b.op("Concat", [batch, b.const([len(row)], "length")], axis=0)
    return b.op("Expand", [b.const(np.asarray(row)[None, :], "rows"), shape])


def ones_sizes(b: NodeBuilder, stream: ir.Value) -> ir.Value:
    """``[B, N]`` of ones: every token stands for one patch before the first merge."""
    shape = b.op("Slice", [b.op("Shape", [stream]), b.const([0], "start"), b.const([2], "end")])
    one = ir.tensor(np.array([1.0], dtype=stream.dtype.numpy()))
    return b.op("ConstantOfShape", [shape], value=one)


def merge_into(
    b: NodeBuilder,
    dst: ir.Value,
    dst_sizes: ir.Value,
    src: ir.Value,
    src_sizes: ir.Value,
    assign: ir.Value,
    destinations: int,
    dtype: ir.DataType,
    unweighted: bool = False,
) -> tuple[ir.Value, ir.Value]:
    """Merge ``src [B, r, C]`` into ``dst [B, m, C]`` (``m = destinations``) along ``assign [B, r]``.

    Size-weighted mean (ToMe's ``merge_wavg``): ``x = (dst·s_dst + Mᵀ(src·s_src)) / (s_dst + Mᵀ s_src)``.
    ``unweighted`` (DiffRate): ``x = (dst + Mᵀ src) / (1 + Mᵀ 1)``. Either way the new sizes are
    ``s_dst + Mᵀ s_src``. ``M [B, r, m]`` is the one-hot assignment; ``dtype`` is the stream's float type.
    Returns (merged destinations, their sizes).
    """
    onehot_t = b.op("Transpose", [one_hot(b, assign, destinations, dtype)], perm=[0, 2, 1])  # [B, m, r]
    gained = b.op("MatMul", [onehot_t, b.unsqueeze(src_sizes, [-1])])  # [B, m, 1]
    sizes = b.op("Add", [dst_sizes, b.op("Squeeze", [gained, b.const([-1], "axes")])])
    if unweighted:
        one = b.const(np.array(1.0, dtype=dtype.numpy()), "one", dtype=dtype.numpy())
        counts = b.op("Add", [one, b.reduce("ReduceSum", onehot_t, [-1], keepdims=True)])  # [B, m, 1]
        total = b.op("Add", [dst, b.op("MatMul", [onehot_t, src])])
        return b.op("Div", [total, counts], "merged"), sizes
    weighted = b.op("Mul", [src, b.unsqueeze(src_sizes, [-1])])
    total = b.op("Add", [b.op("Mul", [dst, b.unsqueeze(dst_sizes, [-1])]), b.op("MatMul", [onehot_t, weighted])])
    return b.op("Div", [total, b.unsqueeze(sizes, [-1])], "merged"), sizes


def assemble(
    b: NodeBuilder,
    h: ir.Value,
    sizes: ir.Value,
    specials: int,
    kept: ir.Value,
    merged: ir.Value,
    merged_sizes: ir.Value,
) -> SiteOutput:
    """``[specials, rows kept of h, merged destinations]`` and their sizes: the output of a merging site."""
    S = specials
    parts = [b.slice(h, 0, S, axis=1)] if S else []
    size_parts = [b.slice(sizes, 0, S, axis=1)] if S else []
    parts += [gather_tokens(b, h, kept), merged]
    size_parts += [b.op("GatherElements", [sizes, kept], axis=1), merged_sizes]
    out = b.op("Concat", parts, "tokens", axis=1)
    return SiteOutput(out, b.op("Concat", size_parts, "sizes", axis=1), dict(b.exposed))


def merge_origin(b: NodeBuilder, kept: ir.Value, destinations: list[int]) -> ir.Value:
    """Positions whose rotary rows the output of :func:`assemble` takes: each kept token its own, each merged
    destination its own (sources merged into it take the destination's position)."""
    return b.op("Concat", [kept, batch_rows(b, destinations, kept)], "origin", axis=1)


def assignment(b: NodeBuilder, placed: list[tuple[ir.Value, ir.Value]]) -> ir.Value:
    """``[B, N]`` int64: for each input position, the value it is placed with. ``placed`` pairs ``(positions [B, k],
    values [B, k])`` cover every input position exactly once (a permutation of ``0..N-1`` in all), so the inverse
    permutation is an ascending ``TopK(K=N)`` of the positions (on their float cast, exact below 2**24) and the
    values are gathered in that order: no scatter."""
    positions = b.op("Concat", [p for p, _ in placed], "placed", axis=1)
    values = b.op("Concat", [v for _, v in placed], "placed_values", axis=1)
    total = b.op("Slice", [b.op("Shape", [positions]), b.const([1], "start"), b.const([2], "end")])
    as_float = b.op("Cast", [positions], to=ir.DataType.FLOAT)
    _, order = b.op("TopK", [as_float, total], "inverse", num_outputs=2, axis=-1, largest=0, sorted=1)
    return b.op("GatherElements", [values, order], "assign", axis=1)


def offset_rows(b: NodeBuilder, like: ir.Value, start: int, count: int, step: int = 1) -> ir.Value:
    """``[B, count]`` int64 rows ``start, start + step, ...`` for every sample of ``like [B, ...]``."""
    return batch_rows(b, list(range(start, start + step * count, step)), like)


def complement(b: NodeBuilder, kept: ir.Value, total: int, count: int) -> ir.Value:
    """``[B, count]`` positions of ``0..total-1`` not in ``kept [B, total - count]``, ascending (``TopK(largest=0)``
    of ``position + total·kept``)."""
    np_dtype = np.float32
    mask = b.reduce("ReduceMax", one_hot(b, kept, total, ir.DataType.FLOAT), [1], keepdims=False)  # [B, total]
    key = b.op(
        "Add",
        [
            b.const(np.arange(total), "range", dtype=np_dtype),
            b.op("Mul", [mask, b.const(np.array(total, dtype=np_dtype), "total", dtype=np_dtype)]),
        ],
    )
    _, rest = b.op("TopK", [key, b.const([count], "k")], "complement", num_outputs=2, axis=-1, largest=0, sorted=1)
    return rest


def specials_placed(b: NodeBuilder, like: ir.Value, specials: int) -> list[tuple[ir.Value, ir.Value]]:
    """The special tokens stay at their positions: ``[(0..S-1, 0..S-1)]`` (none when ``S = 0``)."""
    if not specials:
        return []
    rows = offset_rows(b, like, 0, specials)
    return [(rows, rows)]


def pruning_placement(b: NodeBuilder, site: SiteInput, local: ir.Value, result: SiteOutput) -> None:
    """A pruning site's ``assign`` and ``pruned`` (``local [B, K]``: the kept candidates, ascending, in output order
    after the specials): specials stay, kept candidate ``i`` goes to ``S + i``, the pruned ones (ascending position)
    to rows ``-1 - j`` of their rows of the stream at the site."""
    S, n, K = site.specials, site.count.candidates, site.count.params["kept"]
    kept = b.op("Add", [local, b.const(S, "offset")]) if S else local
    placed = [*specials_placed(b, local, S), (kept, offset_rows(b, local, S, K))]
    if n > K:
        pruned = complement(b, local, n, n - K)
        pruned = b.op("Add", [pruned, b.const(S, "offset")]) if S else pruned
        placed.append((pruned, offset_rows(b, local, -1, n - K, step=-1)))
        result.pruned, result.dropped = gather_tokens(b, site.stream, pruned), n - K
    result.assign = assignment(b, placed)
