"""Graph pass: SparseVLM's cuts inside an MLLM **prefill** graph (semantics: :mod:`tokensieve.methods.sparsevlm`).

Matches: the decoder layers of a prefill graph (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`, cache
form ``none``: inputs ``inputs_embeds [1, T, D]`` and ``position_ids [1, T]``). Each cut ``g`` sits on the residual
stream leaving pruning layer ``l = layers[g]``; its score comes from that layer's own ``Softmax`` output.

Inserts:

* graph inputs ``image_positions [I]`` (int64, empty without an image) and, with recycling, ``density_noise
  [cuts, I]`` (float; the DPC-kNN density noise the host feeds, :meth:`SparseVLM.host_inputs`; cut ``g`` reads the
  first ``S`` of row ``g``);
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
from tokensieve.methods.decoder import CUT_OUTPUT
from tokensieve.methods.faces import register
from tokensieve.methods.sparsevlm import NOISE_INPUT, SparseVLM

I64, BOOL = ir.DataType.INT64, ir.DataType.BOOL


@dataclass(frozen=True)
class CutDims:
    """One cut's symbolic lengths, exact expressions of ``sequence`` and ``image_tokens`` (TensorRT derives them from
    the optimization profile's shapes): the sequence and image tokens present, kept, recycled and clusters."""

    seq: str
    image: str
    kept: str
    recycled: str
    clusters: str

    @property
    def rows(self) -> str:
        return f"({self.seq})-({self.image})+({self.kept})"

    @property
    def after(self) -> str:
        return f"{self.rows}+({self.clusters})"

    @property
    def image_after(self) -> str:
        return f"({self.kept})+({self.clusters})"

    @property
    def extended(self) -> str:
        return f"({self.seq})+({self.clusters})"

    @property
    def ranked(self) -> str:
        return f"({self.kept})+({self.recycled})"


def cut_dims(method: SparseVLM, seq: str = "sequence", image: str = "image_tokens") -> list[CutDims]:
    """Every cut's lengths, as :meth:`SparseVLM.stages` counts them."""
    out = []
    for budget in method.budgets:
        kept = f"max(min({budget},({image})-1),0)"
        pruned = f"({image})-({kept})"
        recycled = f"(3*({pruned}))//10+min({pruned},1)" if method.recycle else "0"
        clusters = f"({recycled})//10+min({recycled},1)" if method.recycle else "0"
        dims = CutDims(seq, image, kept, recycled, clusters)
        out.append(dims)
        seq, image = dims.after, dims.image_after
    return out


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


def _range(b: NodeBuilder, count: ir.Value, dim: str) -> ir.Value:
    """``0..count-1`` (int64) for a ``[1]`` count."""
    return typed(b.op("Range", [b.const(0), _scalar(b, count), b.const(1)]), [dim], I64)


def _count(b: NodeBuilder, value: ir.Value, axis: int = 0) -> ir.Value:
    return typed(b.op("Shape", [value], start=axis, end=axis + 1), [1], I64)


def _int(b: NodeBuilder, op: str, x: ir.Value, y: ir.Value | int, hint: str | None = None) -> ir.Value:
    """A ``[1]`` int64 arithmetic step on shape-derived counts."""
    return typed(b.op(op, [x, b.const([y]) if isinstance(y, int) else y], hint), [1], I64)


def _raters(b: NodeBuilder, embeds: ir.Value, image: ir.Value, probs: ir.Value) -> ir.Value:
    """The rater weight ``[T]``: 1 at the text positions after the image whose mean softmax-over-text relevance to
    the image tokens exceeds its mean."""
    seq, real, width = embeds.shape[1], embeds.dtype, embeds.shape[2]
    text, rows = rows_after_image(b, image, probs)
    visual = typed(b.op("Gather", [embeds, image], axis=1), [1, "image_tokens", width], real)
    transposed = typed(b.op("Transpose", [embeds], perm=[0, 2, 1]), [1, width, seq], real)
    logits = typed(b.op("MatMul", [visual, transposed], "relevance"), [1, "image_tokens", seq], real)
    lowest = b.const(np.finfo(np.float32).min, "lowest", dtype=real.numpy())
    is_text = typed(b.op("Cast", [text], to=BOOL), [seq], BOOL)
    masked = typed(b.op("Where", [is_text, logits, lowest]), [1, "image_tokens", seq], real)
    soft = typed(b.op("Softmax", [masked], axis=-1), [1, "image_tokens", seq], real)
    relevance = typed(b.reduce("ReduceMean", soft, [0, 1], keepdims=False), [seq], real)
    total = typed(b.reduce("ReduceSum", relevance, [0], keepdims=True), [1], real)
    mean = typed(b.op("Div", [total, typed(b.op("Cast", [rows], to=real), [1], real)]), [1], real)
    above = typed(b.op("Greater", [relevance, mean]), [seq], BOOL)
    return typed(b.op("Mul", [typed(b.op("Cast", [above], to=real), [seq], real), text], "raters"), [seq], real)


def _counts(b: NodeBuilder, image: ir.Value, budget: int, recycle: bool) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Kept ``K = max(min(budget, N - 1), 0)``, recycled ``S = (3 P) // 10 + min(P, 1)`` with ``P = N - K``, clusters
    ``C = S // 10 + min(S, 1)`` (``[1]`` int64 each; ``S = C = 0`` without recycling)."""
    present = _count(b, image)
    kept = _int(b, "Max", _int(b, "Min", _int(b, "Sub", present, 1), budget), 0, "kept")
    if not recycle:
        return kept, b.const([0]), b.const([0])
    pruned = _int(b, "Sub", present, kept)
    recycled = _int(b, "Add", _int(b, "Div", _int(b, "Mul", pruned, 3), 10), _int(b, "Min", pruned, 1), "recycled")
    clusters = _int(b, "Add", _int(b, "Div", recycled, 10), _int(b, "Min", recycled, 1), "clusters")
    return kept, recycled, clusters


def _dpc_knn(b: NodeBuilder, tokens: ir.Value, noise: ir.Value, clusters: ir.Value, dims: CutDims) -> ir.Value:
    """DPC-kNN of ``tokens [S, D]`` into ``clusters`` merged tokens ``[C, D]`` (see module docstring)."""
    real, width, s, c = tokens.dtype, tokens.shape[1], dims.recycled, dims.clusters
    rows, columns = (
        typed(b.unsqueeze(tokens, [1]), [s, 1, width], real),
        typed(b.unsqueeze(tokens, [0]), [1, s, width], real),
    )
    diff = typed(b.op("Sub", [rows, columns]), [s, s, width], real)
    norm = typed(b.reduce("ReduceL2", diff, [2], keepdims=False), [s, s], real)
    dist = typed(b.op("Div", [norm, b.const(np.sqrt(np.float32(width)), "root", real.numpy())]), [s, s], real)
    near, near_index = b.op("TopK", [dist, clusters], "neighbours", 2, axis=-1, largest=0, sorted=1)
    typed(near_index, [s, c], I64)
    square = typed(b.op("Mul", [typed(near, [s, c], real), near]), [s, c], real)
    spread = typed(b.reduce("ReduceMean", square, [1], keepdims=False), [s], real)
    peak = typed(b.op("Exp", [typed(b.op("Neg", [spread]), [s], real)]), [s], real)
    density = typed(b.op("Add", [peak, noise], "density"), [s], real)
    left, right = typed(b.unsqueeze(density, [0]), [1, s], real), typed(b.unsqueeze(density, [1]), [s, 1], real)
    higher = typed(b.op("Greater", [left, right]), [s, s], BOOL)
    farthest = typed(b.reduce("ReduceMax", dist, [0, 1], keepdims=True), [1, 1], real)
    masked = typed(b.op("Where", [higher, dist, farthest]), [s, s], real)
    parent = typed(b.reduce("ReduceMin", masked, [1], keepdims=False), [s], real)
    score = typed(b.op("Mul", [parent, density]), [s], real)
    centre_score, centres = b.op("TopK", [score, clusters], "centres", 2, axis=-1, largest=1, sorted=1)
    typed(centre_score, [c], real)
    typed(centres, [c], I64)
    centre_rows = typed(b.op("Gather", [dist, centres], axis=0), [c, s], real)
    nearest = typed(b.op("ArgMin", [centre_rows], axis=0, keepdims=0), [s], I64)
    steps = _range(b, clusters, c)
    assign = typed(b.op("ScatterElements", [nearest, centres, steps], "assign", axis=0), [s], I64)
    left, right = typed(b.unsqueeze(assign, [0]), [1, s], I64), typed(b.unsqueeze(steps, [1]), [c, 1], I64)
    members = typed(b.op("Cast", [typed(b.op("Equal", [left, right]), [c, s], BOOL)], to=real), [c, s], real)
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
        self.dims: list[CutDims] = []
        self.noise: ir.Value | None = None

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
        self.dims = cut_dims(self.method, str(embeds.shape[1]))
        b = NodeBuilder(model, "tokensieve/sparsevlm", {"tokensieve.site": "raters", "tokensieve.method": "sparsevlm"})
        image = image_positions_input(graph)
        if self.method.recycle:
            shape = ir.Shape([len(self.method.layers), "image_tokens"])
            self.noise = ir.Value(name=NOISE_INPUT, shape=shape, type=ir.TensorType(embeds.dtype))
            graph.inputs.append(self.noise)
        weight = _raters(b, embeds, image, layout.layers[0].softmax.outputs[0])
        length = _count(b, embeds, 1)
        sources = _range(b, length, str(embeds.shape[1]))
        graph.extend(b.nodes)
        state = State(embeds, positions, sources, weight, image, length)
        for g in range(len(self.method.layers)):
            state = self._cut(model, g, state)
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def _score(self, b: NodeBuilder, probs: ir.Value, weight: ir.Value) -> ir.Value:
        """``[T]``: the rater-weighted mean over the rows of the head-mean probabilities ``[1, H, T, T]``."""
        seq, real = probs.shape[2], probs.dtype
        mean = typed(b.reduce("ReduceMean", probs, [1], keepdims=False), [1, seq, seq], real)
        rows = typed(b.op("Reshape", [weight, b.const([1, 1, -1])]), [1, 1, seq], real)
        rated = typed(b.op("MatMul", [rows, mean], "rated"), [1, 1, seq], real)
        raters = typed(b.reduce("ReduceSum", weight, [0], keepdims=True), [1], real)
        flat = typed(b.op("Reshape", [rated, b.const([-1])]), [seq], real)
        return typed(b.op("Div", [flat, raters], "score"), [seq], real)

    def _select(self, b: NodeBuilder, dims: CutDims, state: State, score: ir.Value, counts: tuple[ir.Value, ...]):
        """The kept rows ``[T - N + K]`` (ascending) and the image rows recycled ``[S]`` (descending score; ``None``
        without recycling)."""
        real, (kept, recycled, _) = score.dtype, counts
        image_score = typed(b.op("Gather", [score, state.image], axis=0), [dims.image], real)
        length = _count(b, score)
        text = typed(b.op("Expand", [b.const(2.0, "text_priority", dtype=real.numpy()), length]), [dims.seq], real)
        priority = typed(b.op("ScatterElements", [text, state.image, image_score], axis=0), [dims.seq], real)
        count = _int(b, "Add", _int(b, "Sub", length, _count(b, state.image)), kept, "kept_rows")
        values, top = b.op("TopK", [priority, count], "select", 2, largest=1, sorted=1)
        typed(values, [dims.rows], real)
        keep = b.ascending(typed(top, [dims.rows], I64), count, [dims.rows])
        if not self.method.recycle:
            return keep, None
        best = _int(b, "Add", kept, recycled)
        ranked, order = b.op("TopK", [image_score, best], "ranked", 2, largest=1, sorted=1)
        typed(ranked, [dims.ranked], real)
        typed(order, [dims.ranked], I64)
        tail = typed(b.op("Slice", [order, kept, best, b.const([0])]), [dims.recycled], I64)
        return keep, typed(b.op("Gather", [state.image, tail], axis=0), [dims.recycled], I64)

    def _recycle(self, b: NodeBuilder, g: int, cut: ir.Value, chosen: ir.Value, counts: tuple[ir.Value, ...]):
        """``[stream; cluster tokens]`` ``[1, T + C, D]``: the DPC-kNN clusters of the ``chosen`` rows appended."""
        dims, real, width, (_, recycled, clusters) = self.dims[g], cut.dtype, cut.shape[2], counts
        row = typed(b.op("Gather", [self.noise, b.const(g)], axis=0), ["image_tokens"], real)
        noise = typed(b.op("Slice", [row, b.const([0]), recycled, b.const([0])]), [dims.recycled], real)
        picked = typed(b.op("Gather", [cut, chosen], axis=1), [1, dims.recycled, width], real)
        flat = typed(b.op("Squeeze", [picked, b.const([0])]), [dims.recycled, width], real)
        merged = typed(b.unsqueeze(_dpc_knn(b, flat, noise, clusters, dims), [0]), [1, dims.clusters, width], real)
        return typed(b.op("Concat", [cut, merged], axis=1), [1, dims.extended, width], real)

    def _cut(self, model: ir.Model, g: int, state: State) -> State:
        graph, method, layer, dims = model.graph, self.method, self.method.layers[g], self.dims[g]
        cut, probs = self.layout.layers[layer + 1].stream_in, self.layout.layers[layer].softmax.outputs[0]
        region, uses = downstream(cut), list(cut.uses())
        seq, real, width, after = cut.shape[1], cut.dtype, cut.shape[2], dims.after
        meta = {"tokensieve.site": str(layer), "tokensieve.method": "sparsevlm"}
        b = NodeBuilder(model, f"tokensieve/sparsevlm{g}", meta)
        counts = _counts(b, state.image, method.budgets[g], method.recycle)
        keep, chosen = self._select(b, dims, state, self._score(b, probs, state.weight), counts)
        kept, _, clusters = counts
        rows, source, sources, weights = keep, cut, state.sources, state.weight
        if chosen is not None:
            source = self._recycle(b, g, cut, chosen, counts)
            rows = self._place(b, dims, state, keep, clusters, _count(b, cut, 1))
            made = typed(b.op("Add", [_range(b, clusters, dims.clusters), state.next_id]), [dims.clusters], I64)
            sources = typed(b.op("Concat", [state.sources, made], axis=0), [dims.extended], I64)
            zeros = typed(b.op("Expand", [b.const(0.0, "zero", real.numpy()), clusters]), [dims.clusters], real)
            weights = typed(b.op("Concat", [state.weight, zeros], axis=0), [dims.extended], real)
        stream = typed(b.op("Gather", [source, rows], "stream", axis=1), [1, after, width], real)
        kept_sources = typed(b.op("Gather", [sources, rows], axis=0), [after], I64)
        kept_sources.name = f"{CUT_OUTPUT}{g}"
        new_state = State(
            stream,
            self._positions(b, state, rows, after),
            kept_sources,
            typed(b.op("Gather", [weights, rows], axis=0), [after], real),
            self._image_after(b, state.image, _int(b, "Add", kept, clusters), dims),
            _int(b, "Add", state.next_id, clusters),
        )
        graph.extend(b.nodes)
        redirect_uses(cut, stream, uses)
        substitutes = {state.stream: new_state.stream, state.positions: new_state.positions}
        prefix = f"tokensieve/sparsevlm{g}/after"
        clones = rederive(graph, region, substitutes, [stream], prefix, frozenset([state.stream]))
        graph.outputs.append(kept_sources)
        for node in region | set(clones):
            for value in node.outputs:
                if value.shape is not None:
                    value.shape = ir.Shape([after if d == seq else d for d in value.shape])
        record_site(model, {"layer": layer, "method": "sparsevlm", "exposed": {"cut_positions": kept_sources.name}})
        return new_state

    def _image_after(self, b: NodeBuilder, image: ir.Value, count: ir.Value, dims: CutDims) -> ir.Value:
        """The image rows after a cut: ``count`` rows from the image's first row (the text before it is kept)."""
        head = typed(b.op("Slice", [image, b.const([0]), b.const([1])]), [f"min({dims.image},1)"], I64)
        start = typed(b.reduce("ReduceSum", head, [0], keepdims=True), [1], I64)
        return typed(b.op("Add", [_range(b, count, dims.image_after), start]), [dims.image_after], I64)

    def _place(self, b: NodeBuilder, dims: CutDims, state: State, keep: ir.Value, clusters: ir.Value, length):
        """Rows of ``[stream; cluster tokens]`` in the new order: the kept rows ascending, the cluster tokens right
        after the image (integer keys ``row * (C + 1)`` and ``(image_end - 1) * (C + 1) + 1 + j``)."""
        real, after = ir.DataType.FLOAT, dims.after
        stride = _int(b, "Add", clusters, 1)
        ends = typed(b.op("Concat", [state.image, b.const([-1])], axis=0), [f"({dims.image})+1"], I64)
        last = typed(b.reduce("ReduceMax", ends, [0], keepdims=True), [1], I64)
        steps = _range(b, clusters, dims.clusters)
        base = _int(b, "Add", _int(b, "Mul", last, stride), 1)
        row_keys = typed(b.op("Mul", [keep, stride]), [dims.rows], I64)
        cluster_keys = typed(b.op("Add", [steps, base]), [dims.clusters], I64)
        keys = typed(b.op("Concat", [row_keys, cluster_keys], axis=0), [after], I64)
        cluster_rows = typed(b.op("Add", [steps, length]), [dims.clusters], I64)
        rows = typed(b.op("Concat", [keep, cluster_rows], axis=0), [after], I64)
        as_float = typed(b.op("Cast", [keys], to=real), [after], real)
        ordered, order = b.op("TopK", [as_float, _count(b, keys)], "order", 2, axis=-1, largest=0, sorted=1)
        typed(ordered, [after], real)
        typed(order, [after], I64)
        return typed(b.op("Gather", [rows, order], axis=0), [after], I64)

    def _positions(self, b: NodeBuilder, state: State, rows: ir.Value, after: str) -> ir.Value:
        """Position ids after the cut: the first ``T'`` of ``position_ids`` (contiguous) or the rows' own."""
        dtype = state.positions.dtype
        if not self.method.contiguous_positions:
            gathered = b.op("Gather", [state.positions, rows], "position_ids", axis=1)
            return typed(gathered, [state.positions.shape[0], after], dtype)
        sliced = b.op("Slice", [state.positions, b.const([0]), _count(b, rows), b.const([1])], "position_ids")
        return typed(sliced, [1, after], dtype)

    def ensures(self, model: ir.Model) -> None:
        layers, pruning = locate_decoder(model).layers, self.method.layers
        for g, layer in enumerate(pruning):
            last = pruning[g + 1] if g + 1 < len(pruning) else len(layers) - 1
            for later in layers[layer + 1 : last + 1]:
                for value in later.cache_outputs:
                    if value.shape is None or str(value.shape[2]) != self.dims[g].after:
                        raise GraphRewriteError(f"sparsevlm: {value.name} does not carry cut {g}'s sequence")


@register("export", SparseVLM)
def rewrite(graphs: dict[str, ir.Model], method: SparseVLM) -> dict[str, ir.Model]:
    """SparseVLM's export: every cut inside the prefill graph; the decode graphs' layers after each cut on their own
    cache slot (and, with contiguous positions, their own position)."""
    run_passes(graphs["prefill"], [SparseVLMPass(method)])
    split_decode(graphs, method)
    return graphs
