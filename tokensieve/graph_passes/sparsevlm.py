"""Graph pass: SparseVLM's cuts inside an MLLM **prefill** graph (semantics: :mod:`tokensieve.methods.sparsevlm`).

Matches: the decoder layers of a prefill graph (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`, cache
form ``none``: inputs ``inputs_embeds [1, T, D]`` and ``position_ids [1, T]``). Each cut ``g`` sits on the residual
stream leaving pruning layer ``l = layers[g]``; its score comes from that layer's own ``Softmax`` output.

Inserts:

* graph inputs ``image_positions [I]`` (int64, empty without an image) and, with recycling, ``density_noise_<g>
  [recycled_<g>]`` (float; the DPC-kNN density noise the host feeds, :meth:`SparseVLM.density_noise`);
* the raters, once: ``Softmax`` over the text columns (those after the image; the others masked with the lowest
  float) of ``image rows · inputs_embedsᵀ``, mean over the image rows, ``> `` its mean over the text: a 0/1 weight
  over the sequence, carried through every cut (cluster tokens weigh 0);
* per cut: the score (the rater-weighted mean of the head-mean probabilities, ``MatMul``), the kept image tokens
  (FastV's priority ``TopK`` over every position, then ascending), with recycling the pruned tokens of highest score
  (``TopK(K + S)``, the last ``S``), DPC-kNN on them (``ReduceL2`` distances, ``TopK`` neighbours, ``Exp``,
  ``Where``/``ReduceMin`` parent distances, ``TopK`` centres, ``ArgMin`` assignment, ``ScatterElements`` without
  reduction for the centres, one-hot ``MatMul`` means) and the cluster tokens placed after the kept image tokens (an
  ascending ``TopK`` over integer keys); every count is ``Min``/``Max``/integer arithmetic on shapes;
* ``Gather`` of the stream; position ids ``0..T'-1`` (contiguous: a ``Slice`` of ``position_ids``) or gathered
  (original); graph output ``cut_positions_<g> [T']``: each row's source (a prompt position, or ``T + n`` for the
  ``n``-th cluster token made); the later layers' shared tensors are re-derived
  (:func:`tokensieve.graph_passes.rederive.rederive`).

Preconditions (``requires``): a prefill graph with those inputs; the last pruning layer has a layer after it.
Postconditions (``ensures``): ``present_*`` of the layers after each cut carry that cut's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.builder import NodeBuilder, record_site, redirect_uses, typed
from tokensieve.graph_passes.image_attention import rows_after_image
from tokensieve.graph_passes.locate_decoder import DecoderLayout, image_positions_input, locate_decoder
from tokensieve.graph_passes.rederive import downstream, rederive
from tokensieve.graph_passes.split_cache_slot import split_decode
from tokensieve.methods.faces import register
from tokensieve.methods.sparsevlm import SparseVLM, noise_input

I64, BOOL = ir.DataType.INT64, ir.DataType.BOOL


@dataclass
class State:
    """What flows from one cut to the next: the stream before the pruning layer's successor, the position ids,
    each row's source and rater weight, the image rows, and the next cluster number."""

    stream: ir.Value
    positions: ir.Value
    sources: ir.Value
    weight: ir.Value
    image: ir.Value
    next_id: ir.Value


def _input(graph: ir.Graph, name: str) -> ir.Value:
    found = next((v for v in graph.inputs if v.name == name), None)
    if found is None:
        raise GraphRewriteError(f"sparsevlm: the graph has no input {name!r}; it applies to an MLLM prefill graph")
    return found


def _scalar(b: NodeBuilder, value: ir.Value) -> ir.Value:
    return typed(b.op("Squeeze", [value, b.const([0])]), [], I64)


def _range(b: NodeBuilder, count: ir.Value, dim) -> ir.Value:
    """``0..count-1`` (int64) for a ``[1]`` count."""
    return typed(b.op("Range", [b.const(0), _scalar(b, count), b.const(1)]), [dim], I64)


def _count(b: NodeBuilder, value: ir.Value, axis: int = 0) -> ir.Value:
    return typed(b.op("Shape", [value], start=axis, end=axis + 1), [1], I64)


def _raters(b: NodeBuilder, embeds: ir.Value, image: ir.Value, probs: ir.Value) -> ir.Value:
    """The rater weight ``[T]``: 1 at the text positions after the image whose mean softmax-over-text relevance to
    the image tokens exceeds its mean."""
    seq, real = embeds.shape[1], embeds.dtype
    text, rows = rows_after_image(b, image, probs)
    visual = typed(b.op("Gather", [embeds, image], axis=1), [1, "image_tokens", embeds.shape[2]], real)
    transposed = typed(b.op("Transpose", [embeds], perm=[0, 2, 1]), [1, embeds.shape[2], seq], real)
    logits = typed(b.op("MatMul", [visual, transposed], "relevance"), [1, "image_tokens", seq], real)
    lowest = b.const(np.finfo(np.float32).min, "lowest", dtype=real.numpy())
    is_text = typed(b.op("Cast", [text], to=BOOL), [seq], BOOL)
    masked = typed(b.op("Where", [is_text, logits, lowest]), [1, "image_tokens", seq], real)
    soft = typed(b.op("Softmax", [masked], axis=-1), [1, "image_tokens", seq], real)
    relevance = typed(b.reduce("ReduceMean", soft, [0, 1], keepdims=False), [seq], real)
    total = typed(b.reduce("ReduceSum", relevance, [0], keepdims=True), [1], real)
    mean = typed(b.op("Div", [total, typed(b.op("Cast", [rows], to=real), [1], real)]), [1], real)
    above = typed(b.op("Greater", [relevance, mean]), [seq], BOOL)
    return typed(b.op("Mul", [b.op("Cast", [above], to=real), text], "raters"), [seq], real)


def _counts(b: NodeBuilder, image: ir.Value, budget: int, recycle: bool) -> tuple[ir.Value, ...]:
    """Kept ``K = max(min(budget, N - 1), 0)``, recycled ``S = (3 P) // 10 + min(P, 1)`` with ``P = N - K``, clusters
    ``C = S // 10 + min(S, 1)`` (``[1]`` int64 each; ``S = C = 0`` without recycling)."""
    present = _count(b, image)
    below = typed(b.op("Sub", [present, b.const([1])]), [1], I64)
    kept = typed(b.op("Max", [b.op("Min", [b.const([budget]), below]), b.const([0])], "kept"), [1], I64)
    if not recycle:
        return kept, b.const([0]), b.const([0])
    pruned = typed(b.op("Sub", [present, kept]), [1], I64)
    tenth = typed(b.op("Div", [b.op("Mul", [pruned, b.const([3])]), b.const([10])]), [1], I64)
    recycled = typed(b.op("Add", [tenth, b.op("Min", [pruned, b.const([1])])], "recycled"), [1], I64)
    groups = typed(b.op("Div", [recycled, b.const([10])]), [1], I64)
    clusters = typed(b.op("Add", [groups, b.op("Min", [recycled, b.const([1])])], "clusters"), [1], I64)
    return kept, recycled, clusters


def _dpc_knn(b: NodeBuilder, tokens: ir.Value, noise: ir.Value, clusters: ir.Value, g: int) -> ir.Value:
    """DPC-kNN of ``tokens [S, D]`` into ``clusters`` merged tokens ``[C, D]`` (see module docstring)."""
    real, width = tokens.dtype, tokens.shape[1]
    s, c = f"recycled_{g}", f"clusters_{g}"
    diff = typed(b.op("Sub", [b.unsqueeze(tokens, [1]), b.unsqueeze(tokens, [0])]), [s, s, width], real)
    norm = typed(b.reduce("ReduceL2", diff, [2], keepdims=False), [s, s], real)
    dist = typed(b.op("Div", [norm, b.const(np.sqrt(np.float32(width)), "root", real.numpy())]), [s, s], real)
    near, _ = b.op("TopK", [dist, clusters], "neighbours", 2, axis=-1, largest=0, sorted=1)
    typed(_, [s, c], I64)
    square = typed(b.op("Mul", [typed(near, [s, c], real), near]), [s, c], real)
    spread = typed(b.reduce("ReduceMean", square, [1], keepdims=False), [s], real)
    density = typed(b.op("Add", [b.op("Exp", [b.op("Neg", [spread])]), noise], "density"), [s], real)
    higher = typed(b.op("Greater", [b.unsqueeze(density, [0]), b.unsqueeze(density, [1])]), [s, s], BOOL)
    farthest = typed(b.reduce("ReduceMax", dist, [0, 1], keepdims=True), [1, 1], real)
    masked = typed(b.op("Where", [higher, dist, farthest]), [s, s], real)
    parent = typed(b.reduce("ReduceMin", masked, [1], keepdims=False), [s], real)
    score = typed(b.op("Mul", [parent, density]), [s], real)
    _, centres = b.op("TopK", [score, clusters], "centres", 2, axis=-1, largest=1, sorted=1)
    typed(_, [c], real)
    typed(centres, [c], I64)
    rows = typed(b.op("Gather", [dist, centres], axis=0), [c, s], real)
    nearest = typed(b.op("ArgMin", [rows], axis=0, keepdims=0), [s], I64)
    steps = _range(b, clusters, c)
    assign = typed(b.op("ScatterElements", [nearest, centres, steps], "assign", axis=0), [s], I64)
    onehot = typed(b.op("Equal", [b.unsqueeze(assign, [0]), b.unsqueeze(steps, [1])]), [c, s], BOOL)
    members = typed(b.op("Cast", [onehot], to=real), [c, s], real)
    sums = typed(b.op("MatMul", [members, tokens], "cluster_sums"), [c, width], real)
    sizes = typed(b.reduce("ReduceSum", members, [1], keepdims=True), [c, 1], real)
    divisor = typed(b.op("Add", [sizes, b.const(1e-6, "eps", real.numpy())]), [c, 1], real)
    return typed(b.op("Div", [sums, divisor], "cluster_tokens"), [c, width], real)


class SparseVLMPass(ir.passes.InPlacePass):
    """Insert SparseVLM's cuts into a prefill graph (see module docstring)."""

    def __init__(self, method: SparseVLM):
        super().__init__()
        self.method = method
        self.layout: DecoderLayout | None = None
        self.lengths: list[str] = []

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_decoder(model)
        if self.layout.cache != "none":
            raise GraphRewriteError(
                f"sparsevlm: expected a prefill graph, got a decode graph ({self.layout.cache} cache)"
            )
        self.method.check_range(len(self.layout.layers))
        for name in ("inputs_embeds", "position_ids"):
            _input(model.graph, name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, layout = model.graph, self.layout
        embeds, positions = _input(graph, "inputs_embeds"), _input(graph, "position_ids")
        b = NodeBuilder(model, "tokensieve/sparsevlm", {"tokensieve.site": "raters", "tokensieve.method": "sparsevlm"})
        image = image_positions_input(graph)
        weight = _raters(b, embeds, image, layout.layers[0].softmax.outputs[0])
        length = _count(b, embeds, 1)
        sources = _range(b, length, embeds.shape[1])
        graph.extend(b.nodes)
        state = State(embeds, positions, sources, weight, image, length)
        for g in range(len(self.method.layers)):
            state = self._cut(model, g, state)
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def _select(self, b: NodeBuilder, g: int, state: State, score: ir.Value, counts: tuple[ir.Value, ...]):
        """The kept rows ``[T - N + K]`` (ascending) and the image tokens ``[S]`` recycled (descending score)."""
        seq, real = state.weight.shape[0], score.dtype
        kept, recycled, _ = counts
        image_score = typed(b.op("Gather", [score, state.image], axis=0), [f"image_{g}"], real)
        length = _count(b, score)
        text = typed(b.op("Expand", [b.const(2.0, "text_priority", dtype=real.numpy()), length]), [seq], real)
        priority = typed(b.op("ScatterElements", [text, state.image, image_score], axis=0), [seq], real)
        others = typed(b.op("Sub", [length, _count(b, state.image)]), [1], I64)
        count = typed(b.op("Add", [others, kept], "kept_rows"), [1], I64)
        values, top = b.op("TopK", [priority, count], "select", 2, largest=1, sorted=1)
        typed(values, [f"kept_rows_{g}"], real)
        keep = b.ascending(typed(top, [f"kept_rows_{g}"], I64), count, [f"kept_rows_{g}"])
        if not self.method.recycle:
            return keep, None
        best = typed(b.op("Add", [kept, recycled]), [1], I64)
        _, order = b.op("TopK", [image_score, best], "ranked", 2, largest=1, sorted=1)
        typed(_, [f"ranked_{g}"], real)
        typed(order, [f"ranked_{g}"], I64)
        tail = typed(b.op("Slice", [order, kept, best, b.const([0])]), [f"recycled_{g}"], I64)
        return keep, typed(b.op("Gather", [state.image, tail], axis=0), [f"recycled_{g}"], I64)

    def _cut(self, model: ir.Model, g: int, state: State) -> State:
        graph, method, layer = model.graph, self.method, self.method.layers[g]
        cut, probs = self.layout.layers[layer + 1].stream_in, self.layout.layers[layer].softmax.outputs[0]
        region, uses = downstream(cut), list(cut.uses())
        seq, real, width = cut.shape[1], cut.dtype, cut.shape[2]
        b = NodeBuilder(model, f"tokensieve/sparsevlm{g}", {"tokensieve.site": str(layer), "tokensieve.method": "sparsevlm"})
        mean = typed(b.reduce("ReduceMean", probs, [1], keepdims=False), [1, seq, seq], real)
        rows = typed(b.op("Reshape", [state.weight, b.const([1, 1, -1])]), [1, 1, seq], real)
        rated = typed(b.op("MatMul", [rows, mean], "rated"), [1, 1, seq], real)
        raters = typed(b.reduce("ReduceSum", state.weight, [0], keepdims=True), [1], real)
        score = typed(b.op("Div", [b.op("Reshape", [rated, b.const([-1])]), raters], "score"), [seq], real)
        counts = _counts(b, state.image, method.budgets[g], method.recycle)
        keep, recycled = self._select(b, g, state, score, counts)
        kept, _, clusters = counts
        after = f"sparsevlm_{g}"
        if recycled is None:
            rows_out, source, extra, weights = keep, cut, state.sources, state.weight
        else:
            noise = ir.Value(name=noise_input(g), shape=ir.Shape([f"recycled_{g}"]), type=ir.TensorType(real))
            graph.inputs.append(noise)
            chosen = typed(b.op("Gather", [cut, recycled], axis=1), [1, f"recycled_{g}", width], real)
            flat = typed(b.op("Squeeze", [chosen, b.const([0])]), [f"recycled_{g}", width], real)
            merged = b.unsqueeze(_dpc_knn(b, flat, noise, clusters, g), [0])
            source = typed(b.op("Concat", [cut, typed(merged, [1, f"clusters_{g}", width], real)], axis=1),
                           [1, f"{seq}+c{g}", width], real)  # fmt: skip
            rows_out = self._place(b, g, state, keep, clusters, _count(b, cut, 1))
            made = typed(b.op("Add", [_range(b, clusters, f"clusters_{g}"), state.next_id]), [f"clusters_{g}"], I64)
            extra = typed(b.op("Concat", [state.sources, made], axis=0), [f"{seq}+c{g}"], I64)
            zeros = typed(b.op("Expand", [b.const(0.0, "zero", real.numpy()), clusters]), [f"clusters_{g}"], real)
            weights = typed(b.op("Concat", [state.weight, zeros], axis=0), [f"{seq}+c{g}"], real)
        stream = typed(b.op("Gather", [source, rows_out], "stream", axis=1), [1, after, width], real)
        sources = typed(b.op("Gather", [extra, rows_out], axis=0), [after], I64)
        sources.name = f"cut_positions_{g}"
        weight = typed(b.op("Gather", [weights, rows_out], axis=0), [after], real)
        new_positions = self._positions(b, state, rows_out, after)
        start = typed(b.reduce("ReduceSum", b.op("Slice", [state.image, b.const([0]), b.const([1])]), [0], True), [1], I64)
        image = typed(b.op("Add", [_range(b, b.op("Add", [kept, clusters]), f"image_{g + 1}"), start]), [f"image_{g + 1}"], I64)
        next_id = typed(b.op("Add", [state.next_id, clusters]), [1], I64)
        graph.extend(b.nodes)
        redirect_uses(cut, stream, uses)
        substitutes = {state.stream: stream, state.positions: new_positions}
        clones = rederive(graph, region, substitutes, [stream], f"tokensieve/sparsevlm{g}/after", frozenset([state.stream]))
        graph.outputs.append(sources)
        for node in region | set(clones):
            for value in node.outputs:
                if value.shape is not None:
                    value.shape = ir.Shape([after if d == seq else d for d in value.shape])
        self.lengths.append(after)
        record_site(model, {"layer": layer, "method": "sparsevlm", "exposed": {"cut_positions": sources.name}})
        return State(stream, new_positions, sources, weight, image, next_id)

    def _place(self, b: NodeBuilder, g: int, state: State, keep: ir.Value, clusters: ir.Value, length: ir.Value):
        """Rows of ``[stream; cluster tokens]`` in the new order: the kept rows ascending with the cluster tokens
        right after the image (integer keys ``row * (C + 1)`` and ``(image_end - 1) * (C + 1) + 1 + j``)."""
        real = ir.DataType.FLOAT
        stride = typed(b.op("Add", [clusters, b.const([1])]), [1], I64)
        last = typed(b.reduce("ReduceMax", b.op("Concat", [state.image, b.const([-1])], axis=0), [0], True), [1], I64)
        steps = _range(b, clusters, f"clusters_{g}")
        base = typed(b.op("Add", [b.op("Mul", [last, stride]), b.const([1])]), [1], I64)
        keys = typed(b.op("Concat", [b.op("Mul", [keep, stride]), b.op("Add", [steps, base])], axis=0),
                     [f"sparsevlm_{g}"], I64)  # fmt: skip
        rows = typed(b.op("Concat", [keep, b.op("Add", [steps, length])], axis=0), [f"sparsevlm_{g}"], I64)
        total = _count(b, keys)
        as_float = typed(b.op("Cast", [keys], to=real), [f"sparsevlm_{g}"], real)
        _, order = b.op("TopK", [as_float, total], "order", 2, axis=-1, largest=0, sorted=1)
        typed(_, [f"sparsevlm_{g}"], real)
        typed(order, [f"sparsevlm_{g}"], I64)
        return typed(b.op("Gather", [rows, order], axis=0), [f"sparsevlm_{g}"], I64)

    def _positions(self, b: NodeBuilder, state: State, rows: ir.Value, after: str) -> ir.Value:
        """Position ids after the cut: the first ``T'`` of ``position_ids`` (contiguous) or the rows' own."""
        dtype = state.positions.dtype
        if not self.method.contiguous_positions:
            return typed(b.op("Gather", [state.positions, rows], "position_ids", axis=1), [1, after], dtype)
        end = _count(b, rows)
        sliced = b.op("Slice", [state.positions, b.const([0]), end, b.const([1])], "position_ids")
        return typed(sliced, [1, after], dtype)

    def ensures(self, model: ir.Model) -> None:
        layers = locate_decoder(model).layers
        for g, layer in enumerate(self.method.layers):
            for later in layers[layer + 1 :]:
                if g + 1 < len(self.method.layers) and later.index > self.method.layers[g + 1]:
                    break
                for value in later.cache_outputs:
                    if value.shape is None or str(value.shape[2]) != self.lengths[g]:
                        raise GraphRewriteError(f"sparsevlm: {value.name} does not carry cut {g}'s sequence")


@register("export", SparseVLM)
def rewrite(graphs: dict[str, ir.Model], method: SparseVLM) -> dict[str, ir.Model]:
    """SparseVLM's export: every cut inside the prefill graph; the decode graphs' layers after each cut on their own
    cache slot (and, with contiguous positions, their own position)."""
    run_passes(graphs["prefill"], [SparseVLMPass(method)])
    split_decode(graphs, method)
    return graphs
