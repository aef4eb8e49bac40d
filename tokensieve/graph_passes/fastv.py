"""Graph pass: FastV visual-token dropping inside an MLLM **prefill** graph.

Matches: the decoder layers of a prefill graph (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`, cache
form ``none``: inputs ``inputs_embeds [1, T, D]`` and ``position_ids [1, T]``, keys/values leaving as
``present_*``). The site is the residual stream entering layer ``k``; the score comes from layer ``k - 1``.

Inserts:

* a graph input ``image_positions [I]`` (int64): the sequence positions of the image tokens (the host knows them
  from ``input_ids``; empty for a text-only prompt). ``I`` is a shape, so every count below is shape-derived;
* the score: layer ``k - 1``'s attention row of the last position, recomputed from the operands of its logits
  ``MatMul`` (Q and Kᵀ after RoPE and scaling, GQA-expanded: no ``[T, T]`` matrix is read), ``Softmax``, mean over
  heads;
* the selection: a priority over all ``T`` positions (2.0 for text, the score for image positions: ``ScatterElements``
  without reduction) -> ``TopK(T - I + R)`` with ``R = ceil(keep * I)`` in integer arithmetic (lower index first on
  ties) -> ascending order (``TopK(largest=0)``) -> graph output ``kept_positions [T']``;
* ``Gather`` of the stream and of ``position_ids`` (kept tokens keep their original positions); the layers from
  ``k`` on read the gathered stream, and every tensor they share with the earlier layers (RoPE ``cos``/``sin``,
  the causal mask, ``repeat_kv`` shapes) is re-derived from the gathered positions and the reduced length
  (:func:`tokensieve.graph_passes.rederive.rederive`).

Preconditions (``requires``): a prefill graph with those inputs; ``1 <= k < layers``; the logits of layer ``k - 1``
are ``Q·Kᵀ`` plus the causal mask only (no other bias: its last row is then unmasked); ``inputs_embeds`` is read for
its values only by layer 0 (elsewhere only through ``Shape``; checked while re-deriving). Postconditions
(``ensures``): ``present_*`` of layers ``>= k`` have the sequence dimension :func:`kept_dim` (an exact expression of
``sequence`` and ``image_tokens``), every new value has a shape (``tokensieve lint`` checks them), and the graph
passes the onnx checker when saved.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.builder import NodeBuilder, record_site, redirect_uses, typed
from tokensieve.graph_passes.locate_decoder import DecoderLayout, graph_input, locate_decoder, logits_matmul
from tokensieve.graph_passes.rederive import downstream, rederive
from tokensieve.graph_passes.split_cache_slot import split_decode
from tokensieve.methods.faces import register
from tokensieve.methods.fastv import FastV

IMAGE_AXIS = "image_tokens"


def kept_dim(method: FastV, sequence: str) -> str:
    """The symbolic length after the cut, as an exact expression of the input axes (TensorRT derives it from the
    optimization profile's shapes): ``sequence - image_tokens + ceil(keep * image_tokens)``."""
    num, den = method.keep.numerator, method.keep.denominator
    return f"{sequence}-{IMAGE_AXIS}+({IMAGE_AXIS}*{num}+{den - 1})//{den}"


class FastVPass(ir.passes.InPlacePass):
    """Insert FastV before decoder layer ``method.k`` of a prefill graph (see module docstring)."""

    def __init__(self, method: FastV):
        super().__init__()
        self.method = method
        self.layout: DecoderLayout | None = None
        self.kept = ""

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_decoder(model)
        if self.layout.cache != "none":
            raise GraphRewriteError(f"fastv: expected a prefill graph, got a decode graph ({self.layout.cache} cache)")
        self.method.check_range(len(self.layout.layers))
        for name in ("inputs_embeds", "position_ids"):
            graph_input(model.graph, name, "fastv")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, method, layout = model.graph, self.method, self.layout
        embeds, positions = graph_input(graph, "inputs_embeds", "fastv"), graph_input(graph, "position_ids", "fastv")
        scorer, cut = layout.layers[method.k - 1], layout.layers[method.k].stream_in
        region, uses = downstream(cut), list(cut.uses())
        self.kept = kept = kept_dim(method, str(cut.shape[1]))
        b = NodeBuilder(model, "tokensieve/fastv", {"tokensieve.site": str(method.k), "tokensieve.method": "fastv"})
        image = ir.Value(name="image_positions", shape=ir.Shape([IMAGE_AXIS]), type=ir.TensorType(ir.DataType.INT64))
        graph.inputs.append(image)

        seq, heads, real, i64 = cut.shape[1], layout.heads, cut.dtype, ir.DataType.INT64

        # score [T]: the last row of layer k-1's attention, averaged over heads
        matmul = logits_matmul(scorer.softmax)
        query = b.op("Slice", [matmul.inputs[0], b.const([-1]), b.const([2**62]), b.const([2])], "last_query")
        typed(query, [1, heads, 1, layout.head_dim], real)
        logits = typed(b.op("MatMul", [query, matmul.inputs[1]], "logits"), [1, heads, 1, seq], real)
        row = typed(b.op("Softmax", [logits], axis=-1), [1, heads, 1, seq], real)
        mean = typed(b.reduce("ReduceMean", row, [1], keepdims=False), [1, 1, seq], real)
        score = typed(b.op("Reshape", [mean, b.const([-1])], "score"), [seq], real)

        # priority: 2.0 (above any probability) for text, the score for image positions
        length = typed(b.op("Shape", [score]), [1], i64)
        image_count = typed(b.op("Shape", [image]), [1], i64)
        text = typed(b.op("Expand", [b.const(2.0, "text_priority", dtype=real.numpy()), length]), [seq], real)
        image_score = typed(b.op("Gather", [score, image], axis=0), [IMAGE_AXIS], real)
        priority = typed(b.op("ScatterElements", [text, image, image_score], "priority", axis=0), [seq], real)

        # kept count = T - I + ceil(keep * I), integer arithmetic on shapes
        num, den = method.keep.numerator, method.keep.denominator
        scaled = typed(b.op("Mul", [image_count, b.const([num])]), [1], i64)
        rounded = typed(b.op("Add", [scaled, b.const([den - 1])]), [1], i64)
        kept_image = typed(b.op("Div", [rounded, b.const([den])]), [1], i64)
        text_count = typed(b.op("Sub", [length, image_count]), [1], i64)
        count = typed(b.op("Add", [text_count, kept_image], "kept_count"), [1], i64)

        # top positions by priority (ties: lower index first), then ascending
        top_values, top = b.op("TopK", [priority, count], "select", num_outputs=2, largest=1, sorted=1)
        typed(top_values, [kept], real)
        typed(top, [kept], i64)
        keep = b.ascending(top, count, [kept])
        keep.name = "kept_positions"

        stream = typed(b.op("Gather", [cut, keep], "stream", axis=1), [1, kept, cut.shape[2]], real)
        rows = positions.shape[0]  # 1, or mRoPE's 3 rows: kept tokens keep their columns
        new_positions = typed(b.op("Gather", [positions, keep], "position_ids", axis=1), [rows, kept], positions.dtype)
        graph.extend(b.nodes)
        redirect_uses(cut, stream, uses)
        substitutes = {embeds: stream, positions: new_positions}
        clones = rederive(
            graph, region, substitutes, [stream], "tokensieve/fastv/after", shape_only=frozenset([embeds])
        )
        graph.outputs.append(keep)
        TopologicalSortPass()(model)
        # every sequence-length dimension after the cut (region and re-derived side inputs) is now the kept length
        for node in region | set(clones):
            for value in node.outputs:
                if value.shape is not None:
                    value.shape = ir.Shape([kept if d == seq else d for d in value.shape])
        record_site(model, {"layer": method.k, "method": "fastv", "exposed": {"kept_positions": keep.name}})
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        for layer in locate_decoder(model).layers[self.method.k :]:
            for value in layer.cache_outputs:
                if value.shape is None or str(value.shape[2]) != self.kept:
                    raise GraphRewriteError(f"fastv: {value.name} does not carry the reduced sequence after the pass")


@register("export", FastV)
def rewrite(graphs: dict[str, ir.Model], method: FastV) -> dict[str, ir.Model]:
    """FastV's export: the prefill graph drops the image tokens, the decode graphs' later layers get their own
    cache length (one slot input)."""
    run_passes(graphs["prefill"], [FastVPass(method)])
    split_decode(graphs, method)
    return graphs
