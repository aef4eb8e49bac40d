"""Graph pass: decouple which cache slots attention sees from the slot being written, in a fixed-cache decode graph.

The exported decode graph masks out the slots after ``cache_position`` (the slot it writes): right while the cache
fills in order, wrong for a ring cache (KV eviction such as StreamingLLM), where every slot holds a live position
once the cache is full and the slot written moves around.

Matches: the layers of a fixed-cache decode graph (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`);
per layer, the additive mask operand of the ``Add`` between the logits ``MatMul`` and the ``Softmax``.

Inserts: a graph input ``visible_slots [1]`` (int64: slots ``0..visible_slots-1`` are attended to); the mask the
attention ``Add`` nodes read is re-derived from ``visible_slots - 1`` in place of ``cache_position``
(:func:`tokensieve.graph_passes.rederive.rederive`); the cache write keeps using ``cache_position``. Feeding
``visible_slots = cache_position + 1`` reproduces the original graph.

Preconditions (``requires``): a fixed-cache decode graph with a ``cache_position`` input and an additive mask on
every layer's logits. Postconditions (``ensures``): no attention ``Add`` reads a value derived from
``cache_position``.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.locate import _ancestors
from tokensieve.graph_passes.locate_decoder import DecoderLayout, locate_decoder, logits_matmul
from tokensieve.graph_passes.rederive import rederive
from tokensieve.methods.faces import register
from tokensieve.methods.streamingllm import StreamingLLM

VISIBLE = "visible_slots"


def _mask_adds(layout: DecoderLayout) -> list[tuple[ir.Node, ir.Value]]:
    """Per layer: the ``Add`` that puts the mask on the logits, and its logits-side operand."""
    found = []
    for layer in layout.layers:
        logits = logits_matmul(layer.softmax).outputs[0]
        value = layer.softmax.inputs[0]
        while value is not logits:
            node = value.producer()
            chain = [v for v in node.inputs if v is not None and logits in _ancestors(v)]
            if node.op_type == "Add" and len(chain) == 1:
                found.append((node, chain[0]))
                break
            value = chain[0]
        else:
            raise GraphRewriteError(f"cache visibility: layer {layer.name} has no additive mask on its logits")
    return found


class CacheVisibilityPass(ir.passes.InPlacePass):
    """Add the ``visible_slots`` input and make the attention masks read it (see module docstring)."""

    def __init__(self):
        super().__init__()
        self.adds: list[tuple[ir.Node, ir.Value]] = []

    def requires(self, model: ir.Model) -> None:
        layout = locate_decoder(model)
        if layout.cache != "fixed":
            raise GraphRewriteError(f"cache visibility: needs a fixed-cache decode graph, not cache {layout.cache!r}")
        if not any(v.name == "cache_position" for v in model.graph.inputs):
            raise GraphRewriteError("cache visibility: the decode graph has no cache_position input")
        self.adds = _mask_adds(layout)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        slot = next(v for v in graph.inputs if v.name == "cache_position")
        visible = ir.Value(name=VISIBLE, shape=ir.Shape(slot.shape), type=ir.TensorType(slot.dtype))
        graph.inputs.append(visible)
        b = NodeBuilder(model, "tokensieve/cache_visibility", {"tokensieve.method": "cache_visibility"})
        last = b.op("Sub", [visible, b.const([1])], "last_visible")
        last.shape, last.dtype = ir.Shape(slot.shape), slot.dtype
        graph.extend(b.nodes)
        region = {add for add, _ in self.adds}
        rederive(graph, region, {slot: last}, [logits for _, logits in self.adds], "tokensieve/cache_visibility")
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        slot = next(v for v in model.graph.inputs if v.name == "cache_position")
        for add, logits in self.adds:
            mask = next(v for v in add.inputs if v is not logits)
            if slot in _ancestors(mask):
                raise GraphRewriteError(f"cache visibility: {add.name} still masks by cache_position")


@register("export", StreamingLLM)
def rewrite(graphs: dict[str, ir.Model], method: StreamingLLM) -> dict[str, ir.Model]:
    """StreamingLLM's export: the fixed decode graph becomes a ring (the growing cache is cut on the host)."""
    run_passes(graphs["decode"], [CacheVisibilityPass()])
    return graphs
