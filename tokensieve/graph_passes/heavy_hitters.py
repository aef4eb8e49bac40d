"""Graph pass: H2O heavy-hitter eviction inside a fixed-capacity **decode** graph.

The decode step attends to the cache, accumulates every slot's attention and chooses the slot to evict, per layer
and KV head; the host only feeds the state back (write slot, slot positions, scores), as it does for the caches.

Matches: a fixed-cache decode graph whose masks read ``visible_slots``
(:class:`tokensieve.graph_passes.cache_visibility.CacheVisibilityPass` first); per layer
(:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`) the attention ``Softmax`` ``[1, H, 1, C]`` and the
two cache writes (``ScatterND``, reduction none).

Inserts:

* inputs ``write_slots [layers, H_kv]`` (int64: the slot each layer and KV head writes the new key/value to),
  ``slot_positions [layers, H_kv, C]`` (int64: the sequence position each slot holds; any value for unused slots)
  and ``h2o_scores [layers, H_kv, C]`` (the accumulated attention of each slot);
* per layer, a ``ScatterND`` index ``[1, H_kv, 1, 3]`` = (0, head, ``write_slots[layer, head]``) in place of the
  shared index derived from ``cache_position``; that input and what only it fed are removed;
* scoring: every layer's step score (the ``"step_score"`` face registered for the method's class: H2O's is the
  layer's attention probabilities; Keyformer's, ``tokensieve.graph_passes.keyformer``, a Gumbel-softmax of the
  logits with noise and temperature inputs) summed over each KV group's query heads, stacked
  ``[layers, H_kv, C]``, added to ``h2o_scores`` with the written slots reset to 0 (the new token starts with its
  own attention) and, with a ``forgetting_factor`` below 1 (A2SF), the old scores multiplied by it first -> output
  ``updated_h2o_scores``;
* selection: among the visible slots (``< visible_slots``) whose position, the new one written in, is at most
  ``position - recent`` (``recent`` a constant, or with a ``prompt_share`` method the input ``recent_window [1]``:
  the count follows the prompt), the lowest updated score (``TopK`` K=1, ``largest=0``: lower slot first on ties)
  -> output ``evict_slots [layers, H_kv]``, the slot the host writes next once the cache holds ``budget + 1`` positions.

Preconditions (``requires``): a fixed-cache decode graph with inputs ``cache_position``, ``position_ids`` and
``visible_slots``; two ``ScatterND`` cache writes per layer. Postconditions (``ensures``): no cache write derives
its index from ``cache_position`` (the input is gone); every write reads ``write_slots``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes import FACES, run_passes
from tokensieve.graph_passes.builder import NodeBuilder, typed
from tokensieve.graph_passes.cache_visibility import VISIBLE, CacheVisibilityPass
from tokensieve.graph_passes.locate import _ancestors
from tokensieve.graph_passes.locate_decoder import DecoderLayer, DecoderLayout, locate_decoder
from tokensieve.graph_passes.prompt_cache import PromptCachePass
from tokensieve.methods.faces import register
from tokensieve.methods.h2o import H2O

WRITE_SLOTS = "write_slots"
SLOT_POSITIONS = "slot_positions"
SCORES_IN = "h2o_scores"
SCORES_OUT = "updated_h2o_scores"
EVICT = "evict_slots"
RECENT = "recent_window"


def graph_input(graph: ir.Graph, name: str, dims: list, dtype: ir.DataType) -> ir.Value:
    """``graph``'s input ``name``, added on first use (the inputs a method's scoring step reads)."""
    found = next((v for v in graph.inputs if v.name == name), None)
    if found is None:
        found = ir.Value(name=name, shape=ir.Shape(dims), type=ir.TensorType(dtype))
        graph.inputs.append(found)
    return found


class HeavyHitterPass(ir.passes.InPlacePass):
    """Per-head cache writes, accumulated attention and the eviction choice of H2O (see module docstring)."""

    def __init__(self, method: H2O):
        super().__init__()
        self.method = method
        self.layout: DecoderLayout | None = None

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_decoder(model)
        if self.layout.cache != "fixed":
            raise GraphRewriteError(f"h2o: needs a fixed-cache decode graph, not cache {self.layout.cache!r}")
        names = {v.name for v in model.graph.inputs}
        missing = sorted({"cache_position", "position_ids", VISIBLE} - names)
        if missing:
            raise GraphRewriteError(f"h2o: the decode graph lacks input(s) {missing}; run CacheVisibilityPass first")
        for layer in self.layout.layers:
            if [n.op_type for n in layer.cache_writes] != ["ScatterND", "ScatterND"]:
                raise GraphRewriteError(f"h2o: layer {layer.index} does not write its cache with two ScatterND")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, layout = model.graph, self.layout
        layers, kv, groups = len(layout.layers), layout.kv_heads, layout.heads // layout.kv_heads
        capacity = int(layout.layers[0].cache_inputs[0].shape[2])
        real, i64 = layout.layers[0].softmax.outputs[0].dtype, ir.DataType.INT64
        inputs = {v.name: v for v in graph.inputs}
        write = ir.Value(name=WRITE_SLOTS, shape=ir.Shape([layers, kv]), type=ir.TensorType(i64))
        held = ir.Value(name=SLOT_POSITIONS, shape=ir.Shape([layers, kv, capacity]), type=ir.TensorType(i64))
        scores = ir.Value(name=SCORES_IN, shape=ir.Shape([layers, kv, capacity]), type=ir.TensorType(real))
        graph.inputs.extend([write, held, scores])
        b = NodeBuilder(model, "tokensieve/h2o", {"tokensieve.method": "h2o"})

        batch = b.const(np.zeros((1, kv, 1, 1), np.int64), "batch")
        heads = b.const(np.arange(kv, dtype=np.int64).reshape(1, kv, 1, 1), "heads")
        attention = []
        for index, layer in enumerate(layout.layers):
            slot = typed(b.op("Gather", [write, b.const(index)], "layer_slots", axis=0), [kv], i64)
            column = typed(b.op("Reshape", [slot, b.const([1, kv, 1, 1])]), [1, kv, 1, 1], i64)
            where = typed(b.op("Concat", [batch, heads, column], "write_index", axis=3), [1, kv, 1, 3], i64)
            for node in layer.cache_writes:
                node.replace_input_with(1, where)
            probs = FACES.lookup("step_score", self.method)(self, b, layer, index)
            grouped = b.op("Reshape", [probs, b.const([1, kv, groups, -1])])
            typed(grouped, [1, kv, groups, capacity], real)
            attention.append(typed(b.reduce("ReduceSum", grouped, [2], keepdims=False), [1, kv, capacity], real))
        step = typed(b.op("Concat", attention, "step_attention", axis=0), [layers, kv, capacity], real)

        slots = b.const(np.arange(capacity, dtype=np.int64), "slots")
        written = typed(b.unsqueeze(write, [2]), [layers, kv, 1], i64)
        fresh = typed(b.op("Equal", [slots, written], "written"), [layers, kv, capacity], ir.DataType.BOOL)
        zero = b.const(0.0, "zero", dtype=real.numpy())
        kept = typed(b.op("Where", [fresh, zero, scores]), [layers, kv, capacity], real)
        if self.method.forgetting_factor != 1:  # A2SF: acc <- factor * acc + step
            factor = b.const(float(self.method.forgetting_factor), "forgetting_factor", dtype=real.numpy())
            kept = typed(b.op("Mul", [kept, factor], "forget"), [layers, kv, capacity], real)
        updated = typed(b.op("Add", [kept, step], SCORES_OUT), [layers, kv, capacity], real)
        updated.name = SCORES_OUT

        position = typed(b.op("Reshape", [inputs["position_ids"], b.const([1, 1, 1])]), [1, 1, 1], i64)
        now = typed(b.op("Where", [fresh, position, held], "positions_now"), [layers, kv, capacity], i64)
        newest_old = typed(b.op("Sub", [position, self._recent(b)]), [1, 1, 1], i64)
        old = typed(b.op("LessOrEqual", [now, newest_old], "old"), [layers, kv, capacity], ir.DataType.BOOL)
        visible = typed(b.op("Less", [slots, inputs[VISIBLE]], "visible"), [capacity], ir.DataType.BOOL)
        candidate = typed(b.op("And", [old, visible], "candidate"), [layers, kv, capacity], ir.DataType.BOOL)
        top = b.const(np.finfo(real.numpy()).max, "not_candidate", dtype=real.numpy())
        ranked = typed(b.op("Where", [candidate, updated, top]), [layers, kv, capacity], real)
        score, lowest = b.op("TopK", [ranked, b.const([1])], "evict", 2, axis=-1, largest=0, sorted=1)
        typed(score, [layers, kv, 1], real)
        typed(lowest, [layers, kv, 1], i64)
        evict = typed(b.op("Reshape", [lowest, b.const([layers, kv])], EVICT), [layers, kv], i64)
        evict.name = EVICT
        graph.extend(b.nodes)
        graph.outputs.extend([updated, evict])

        RemoveUnusedNodesPass()(model)
        if not inputs["cache_position"].uses():
            graph.inputs.remove(inputs["cache_position"])
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def _recent(self, b: NodeBuilder) -> ir.Value:
        """The protected recent count: the constant ``recent``, or, when the counts follow the prompt
        (``prompt_share``), the input ``recent_window [1]`` the host feeds."""
        if self.method.prompt_share is None:
            return b.const(self.method.recent)
        return graph_input(self.layout.layers[0].softmax.graph, RECENT, [1], ir.DataType.INT64)

    def ensures(self, model: ir.Model) -> None:
        names = {v.name: v for v in model.graph.inputs}
        if "cache_position" in names:
            raise GraphRewriteError("h2o: cache_position still feeds the decode graph after the pass")
        for layer in locate_decoder(model).layers:
            for node in layer.cache_writes:
                if names[WRITE_SLOTS] not in _ancestors(node.inputs[1]):
                    raise GraphRewriteError(f"h2o: {node.name} does not write at {WRITE_SLOTS}")


@register("step_score", H2O)
def attention_probabilities(heavy: HeavyHitterPass, b: NodeBuilder, layer: DecoderLayer, index: int) -> ir.Value:
    """H2O's step score: the layer's own attention probabilities ``[1, H, 1, C]``."""
    return layer.softmax.outputs[0]


@register("export", H2O)
def rewrite(graphs: dict[str, ir.Model], method: H2O) -> dict[str, ir.Model]:
    """H2O's export: the prompt cache compressed in prefill, eviction in the fixed decode graph (no growing form)."""
    run_passes(graphs["prefill"], [PromptCachePass(method)])
    run_passes(graphs["decode"], [CacheVisibilityPass(), HeavyHitterPass(method)])
    return graphs
