"""Graph pass: RazorAttention's head classes in an MLLM **prefill** graph and its **fixed decode** graph.

The retrieval heads (``method.heads``, found at export by ``tokensieve.runtimes.razor``) are constants here: per
layer a constant flag per KV head selects between the two cache layouts and the two write slots.

Matches: the decoder layers (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`) of

* a prefill graph (cache form ``none``): each layer's ``present_key_<i>`` / ``present_value_<i>`` ``[1, H_kv, T, d]``;
* a fixed-cache decode graph: each layer's two ``ScatterND`` cache writes and the ``Add`` that puts the mask on its
  logits (:func:`tokensieve.graph_passes.cache_visibility._mask_adds`).

Inserts, prefill (shape-derived from ``T``: ``L = max(window, T // ratio)``, ``D = max(T - sink - L, 0)``):

* per layer the compensation token: keys/values of positions ``sink .. sink + D - 1`` (a ``Where`` on ``Range``
  comparisons), ``ReduceSum`` over positions divided by ``max(D, 1)``, ``Concat``-ed after the prompt (``T + 1``);
* a ``GatherElements`` along the sequence with the layout of :meth:`RazorAttention.layout` (retrieval heads:
  ``0..T`` unchanged; others: sinks, compensation, recent, then unused entries), chosen per KV head by the constant
  flags; it replaces the ``present_*`` outputs (``[1, H_kv, T + 1, d]``; the full tensors stay internal);
* one graph output ``cache_positions [layers, H_kv, T + 1]`` (int64): the position of every entry, ``-2`` for the
  compensation token, ``-1`` unused.

Inserts, decode: a graph input ``pruned_cache_position [1]`` (the non-retrieval heads' write slot); per layer with
non-retrieval heads, **one cache tensor per head class** in place of each ``cache_*`` input / ``ScatterND`` /
``updated_*`` output: the retrieval heads keep the name and the ``C`` slots, the others get ``<name>_local`` with
:meth:`RazorAttention.local_capacity` slots (a class without heads gets no tensor). The step's key/value rows are
split by constant ``Gather`` s along the heads and written by one ``ScatterND`` per tensor (index ``[1, n, 1, 3]`` =
(0, head, ``cache_position`` or ``pruned_cache_position``)); attention reads the tensors ``Pad``-ded to ``C`` slots,
``Concat``-ed along the heads and put back in head order by a constant ``Gather``. The mask the logits ``Add`` reads
becomes per query head: the original for retrieval heads, for the others the mask re-derived from
``pruned_cache_position`` (:func:`tokensieve.graph_passes.rederive.rederive`; it hides the padding) with the
compensation slot ``sink`` set to ``log D`` (``D = cache_position - pruned_cache_position + 1``; the lowest value
when ``D = 0``).

Preconditions (``requires``): ``method.heads`` settled; a prefill graph whose layers output their keys/values, or a
fixed-cache decode graph with ``cache_position`` and two ``ScatterND`` writes per layer. Postconditions
(``ensures``): prefill: every ``present_*`` output has ``T + 1`` entries; decode: every layer with non-retrieval
heads has ``_local`` key and value inputs of the local capacity, written at ``pruned_cache_position``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from tokensieve.errors import GraphRewriteError, MethodSpecError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.builder import NodeBuilder, record_site, typed
from tokensieve.graph_passes.cache_visibility import _mask_adds
from tokensieve.graph_passes.locate import _ancestors
from tokensieve.graph_passes.locate_decoder import DecoderLayout, locate_decoder
from tokensieve.graph_passes.rederive import rederive
from tokensieve.graph_passes.split_cache_slot import slot_input
from tokensieve.methods.faces import register
from tokensieve.methods.razor import COMPENSATION, UNUSED, RazorAttention

POSITIONS = "cache_positions"
LOCAL = "_local"  # suffix of the non-retrieval heads' cache input / output in the decode graph
I64, BOOL = ir.DataType.INT64, ir.DataType.BOOL


class HeadClassCachePass(ir.passes.InPlacePass):
    """Compress the non-retrieval heads' prompt cache (prefill) or give them their own cache tensors, write slot
    and mask (decode); see the module docstring."""

    def __init__(self, method: RazorAttention):
        super().__init__()
        self.method = method
        self.layout: DecoderLayout | None = None

    def requires(self, model: ir.Model) -> None:
        if self.method.heads is None:
            raise GraphRewriteError("razor: the retrieval heads are not settled; export finds them first")
        self.layout = locate_decoder(model)
        beyond = [
            pair for pair in self.method.heads if pair[0] >= len(self.layout.layers) or pair[1] >= self.layout.kv_heads
        ]
        if beyond:
            raise MethodSpecError(
                f"razor: heads {beyond} are not (layer, kv_head) pairs of this decoder ({len(self.layout.layers)} "
                f"layers, {self.layout.kv_heads} KV heads each); give pairs inside it or leave heads out"
            )
        if self.layout.cache == "none":
            if any(len(layer.cache_outputs) != 2 for layer in self.layout.layers):
                raise GraphRewriteError("razor: a prefill layer does not output its keys and values")
        elif self.layout.cache != "fixed" or "cache_position" not in {v.name for v in model.graph.inputs}:
            raise GraphRewriteError(f"razor: needs a fixed-cache decode graph, not cache {self.layout.cache!r}")
        elif any([n.op_type for n in layer.cache_writes] != ["ScatterND"] * 2 for layer in self.layout.layers):
            raise GraphRewriteError("razor: a decode layer does not write its cache with two ScatterND")

    def flags(self, layer: int) -> np.ndarray:
        """``[kv_heads]``: which KV heads of ``layer`` are retrieval heads."""
        return np.array(self.method.retrieval(layer, self.layout.kv_heads))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        b = NodeBuilder(model, "tokensieve/razor", {"tokensieve.method": "razor"})
        if self.layout.cache == "none":
            self._prefill(model, b)
        else:
            self._decode(model, b)
        record_site(model, {"method": "razor", "retrieval_heads": [list(pair) for pair in self.method.heads]})
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    # -- prefill -----------------------------------------------------------------------------------------------
    def _geometry(self, b: NodeBuilder, present: ir.Value, seq: str) -> dict[str, ir.Value]:
        """Shared by every layer: the entry indices and positions of both layouts, and the dropped span's flags."""
        m, entries, real = self.method, f"{seq}+1", present.dtype

        def scalar(op: str, inputs: list[ir.Value], hint: str | None = None) -> ir.Value:
            return typed(b.op(op, inputs, hint), [], I64)

        def row(op: str, inputs: list[ir.Value], dims: str, dtype: ir.DataType = I64, hint: str | None = None):
            return typed(b.op(op, inputs, hint), [dims], dtype)

        shape = typed(b.op("Shape", [present]), [4], I64)
        length = typed(b.op("Gather", [shape, b.const(2)], "length", axis=0), [], I64)
        recent = scalar("Max", [scalar("Div", [length, b.const(m.ratio)]), b.const(m.window)], "recent")
        left = scalar("Sub", [scalar("Sub", [length, b.const(m.sink)]), recent])
        dropped = scalar("Max", [left, b.const(0)], "dropped")
        sink = scalar("Min", [length, b.const(m.sink)], "sinks")
        end = scalar("Add", [sink, dropped], "dropped_end")
        columns = row("Range", [b.const(0), length, b.const(1)], seq, hint="columns")
        after = row("GreaterOrEqual", [columns, sink], seq, BOOL)
        span = row("And", [after, row("Less", [columns, end], seq, BOOL)], seq, BOOL, "dropped_span")
        j = row("Range", [b.const(0), scalar("Add", [length, b.const(1)]), b.const(1)], entries, hint="entries")
        shifted = row("Add", [j, scalar("Sub", [dropped, b.const(1)])], entries, hint="recent_source")
        is_sink, is_comp = row("Less", [j, sink], entries, BOOL), row("Equal", [j, sink], entries, BOOL)
        is_recent = row("LessOrEqual", [j, scalar("Sub", [length, dropped])], entries, BOOL)
        local_index = row("Where", [is_sink, j, row("Where", [is_recent, shifted, length], entries)], entries)
        local_index = row("Where", [is_comp, length, local_index], entries, hint="local_index")
        mark = row("Where", [is_recent, shifted, b.const(UNUSED)], entries)
        compensation = row("Where", [is_comp, b.const(COMPENSATION), mark], entries)
        local_positions = row("Where", [is_sink, j, compensation], entries, hint="local_positions")
        present_entry = row("Less", [j, length], entries, BOOL)
        full_positions = row("Where", [present_entry, j, b.const(UNUSED)], entries, hint="retrieval_positions")
        count = typed(b.op("Cast", [scalar("Max", [dropped, b.const(1)])], to=real), [], real)
        return {
            "span": span, "j": j, "local_index": local_index, "local_positions": local_positions,
            "full_positions": full_positions, "count": count,
        }  # fmt: skip

    def _prefill(self, model: ir.Model, b: NodeBuilder) -> None:
        graph, layout = model.graph, self.layout
        first = layout.layers[0].cache_outputs[0]
        seq = str(first.shape[2])
        entries, kv, dim = f"{seq}+1", layout.kv_heads, layout.head_dim
        geo = self._geometry(b, first, seq)
        span = typed(b.op("Reshape", [geo["span"], b.const([1, 1, -1, 1])]), [1, 1, seq, 1], BOOL)
        positions = []
        for index, layer in enumerate(layout.layers):
            flags = b.const(self.flags(index).reshape(1, kv, 1), "retrieval", dtype=bool)
            entry = typed(b.op("Where", [flags, geo["j"], geo["local_index"]]), [1, kv, entries], I64)
            where = b.op("Where", [flags, geo["full_positions"], geo["local_positions"]], f"positions_{index}")
            positions.append(typed(where, [1, kv, entries], I64))
            index_4d = typed(b.unsqueeze(entry, [3]), [1, kv, entries, 1], I64)
            lead = typed(b.op("Shape", [index_4d], end=3), [3], I64)
            size = typed(b.op("Concat", [lead, b.const([dim])], axis=0), [4], I64)
            expanded = typed(b.op("Expand", [index_4d, size]), [1, kv, entries, dim], I64)
            for full in layer.cache_outputs:
                real = full.dtype
                zero = b.const(0.0, "zero", dtype=real.numpy())
                folded = typed(b.op("Where", [span, full, zero]), [1, kv, seq, dim], real)
                total = typed(b.reduce("ReduceSum", folded, [2], keepdims=True), [1, kv, 1, dim], real)
                mean = typed(b.op("Div", [total, geo["count"]], "compensation"), [1, kv, 1, dim], real)
                extended = typed(b.op("Concat", [full, mean], axis=2), [1, kv, entries, dim], real)
                gathered = typed(b.op("GatherElements", [extended, expanded], axis=2), [1, kv, entries, dim], real)
                slot = next(i for i, out in enumerate(graph.outputs) if out is full)
                full.name, gathered.name = f"{full.name}_full", full.name
                graph.outputs[slot] = gathered
        stacked = typed(b.op("Concat", positions, POSITIONS, axis=0), [len(positions), kv, entries], I64)
        stacked.name = POSITIONS
        graph.extend(b.nodes)
        graph.outputs.append(stacked)

    # -- decode ------------------------------------------------------------------------------------------------
    def _decode(self, model: ir.Model, b: NodeBuilder) -> None:
        graph, layout = model.graph, self.layout
        slot = next(v for v in graph.inputs if v.name == "cache_position")
        local = ir.Value(name=slot_input(0), shape=ir.Shape(slot.shape), type=ir.TensorType(slot.dtype))
        graph.inputs.append(local)
        compressed = [i for i in range(len(layout.layers)) if not self.flags(i).all()]
        adds = dict(zip(range(len(layout.layers)), _mask_adds(layout), strict=True))
        kept = {i: next(v for v in adds[i][0].inputs if v is not adds[i][1]) for i in compressed}
        rederive(graph, {adds[i][0] for i in compressed}, {slot: local}, [adds[i][1] for i in compressed], "razor")
        bias = self._compensation_bias(b, slot, local, layout.layers[0].softmax.outputs[0].dtype)
        for index in compressed:
            self._decode_mask(b, index, adds[index], kept[index], bias)
            for write in layout.layers[index].cache_writes:
                self._split_cache(b, graph, index, write, [slot, local])
        graph.extend(b.nodes)

    def _compensation_bias(self, b: NodeBuilder, slot: ir.Value, local: ir.Value, real: ir.DataType) -> ir.Value:
        """``[C]``: ``log D`` (the lowest value when ``D = 0``) at the compensation slot ``sink``, 0 elsewhere
        (added to the mask, which is 0 there)."""
        capacity = int(self.layout.layers[0].cache_inputs[0].shape[2])
        difference = typed(b.op("Sub", [slot, local]), [1], I64)
        count = typed(b.op("Add", [difference, b.const([1])], "compensated"), [1], I64)
        at_least_one = typed(b.op("Cast", [typed(b.op("Max", [count, b.const([1])]), [1], I64)], to=real), [1], real)
        log = typed(b.op("Log", [at_least_one], "log_count"), [1], real)
        lowest = b.const(np.finfo(real.numpy()).min, "lowest", dtype=real.numpy())
        some = typed(b.op("Greater", [count, b.const([0])]), [1], BOOL)
        value = typed(b.op("Where", [some, log, lowest]), [1], real)
        is_comp = b.const(np.arange(capacity) == self.method.sink, "compensation_slot", dtype=bool)
        zero = b.const(0.0, "zero", dtype=real.numpy())
        return typed(b.op("Where", [is_comp, value, zero], "compensation_bias"), [capacity], real)

    def _decode_mask(
        self, b: NodeBuilder, index: int, add_pair: tuple[ir.Node, ir.Value], original: ir.Value, bias: ir.Value
    ) -> None:
        """The per-query-head mask of one layer with non-retrieval heads (``original``: the mask before the pass)."""
        layout, (add, logits) = self.layout, add_pair
        heads, real = layout.heads, logits.dtype
        capacity = int(layout.layers[0].cache_inputs[0].shape[2])
        rederived = next(v for v in add.inputs if v is not logits)
        compensated = typed(b.op("Add", [rederived, bias]), [1, 1, 1, capacity], real)
        per_query = np.repeat(self.flags(index), heads // layout.kv_heads).reshape(1, heads, 1, 1)
        mask = b.op("Where", [b.const(per_query, "retrieval_query_heads", dtype=bool), original, compensated])
        typed(mask, [1, heads, 1, capacity], real)
        add.replace_input_with(list(add.inputs).index(rederived), mask)

    def _split_cache(self, b: NodeBuilder, graph: ir.Graph, index: int, write: ir.Node, slots: list[ir.Value]) -> None:
        """Replace one cache tensor (its input, ``ScatterND`` write and output) of layer ``index`` by one per head
        class (retrieval heads: ``C`` slots written at ``slots[0]``; the others: ``local_capacity(C)`` slots written at
        ``slots[1]``, the ``_local`` input/output); attention reads both, padded to ``C`` and in head order again."""
        cache, old = write.inputs[0], write.outputs[0]
        capacity, real, kv = int(cache.shape[2]), cache.dtype, self.layout.kv_heads
        dims = [1, kv, capacity, self.layout.head_dim]
        flags = self.flags(index)
        classes = [np.flatnonzero(flags), np.flatnonzero(~flags)]
        sizes = (capacity, self.method.local_capacity(capacity))
        parts = [
            self._class_cache(b, write, heads, slot, size, suffix)
            for heads, slot, size, suffix in zip(classes, slots, sizes, ("", LOCAL), strict=True)
            if len(heads)
        ]
        padded = [part[2] for part in parts]
        joined = typed(padded[0] if len(padded) == 1 else b.op("Concat", padded, axis=1), dims, real)
        order = np.concatenate(classes)
        if (order != np.arange(kv)).any():  # back in head order
            joined = typed(b.op("Gather", [joined, b.const(np.argsort(order))], axis=1), dims, real)
        old.name, cache.name = f"{old.name}_whole", f"{cache.name}_whole"
        _replace(graph.outputs, old, [part[1] for part in parts])
        _replace(graph.inputs, cache, [part[0] for part in parts])
        old.replace_all_uses_with(joined)

    def _class_cache(
        self, b: NodeBuilder, write: ir.Node, heads: np.ndarray, slot: ir.Value, size: int, suffix: str
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """The cache tensor of the KV heads ``heads`` (``size`` slots, written at ``slot``): its graph input, its
        updated output and that output padded to the original capacity."""
        cache, update = write.inputs[0], write.inputs[2]
        n, capacity, dim, real = len(heads), int(cache.shape[2]), int(cache.shape[3]), cache.dtype
        part = ir.Value(name=cache.name + suffix, shape=ir.Shape([1, n, size, dim]), type=ir.TensorType(real))
        rows = typed(b.op("Gather", [update, b.const(heads, "class_heads")], axis=1), [1, n, 1, dim], real)
        at = typed(b.op("Reshape", [slot, b.const([1, 1, 1, 1])]), [1, 1, 1, 1], I64)
        column = typed(b.op("Expand", [at, b.const([1, n, 1, 1])]), [1, n, 1, 1], I64)
        batch, head = b.const(np.zeros((1, n, 1, 1)), "batch"), b.const(np.arange(n).reshape(1, n, 1, 1), "heads")
        where = typed(b.op("Concat", [batch, head, column], "write_index", axis=3), [1, n, 1, 3], I64)
        written = typed(b.op("ScatterND", [part, where, rows]), [1, n, size, dim], real)
        written.name = write.outputs[0].name + suffix
        if size == capacity:
            return part, written, written
        pads = b.const([0, 0, 0, 0, 0, 0, capacity - size, 0], "pads")
        return part, written, typed(b.op("Pad", [written, pads], mode="constant"), [1, n, capacity, dim], real)

    def ensures(self, model: ir.Model) -> None:
        if self.layout.cache == "none":
            for value in model.graph.outputs:
                if value.name.startswith("present_") and not str(value.shape[2]).endswith("+1"):
                    raise GraphRewriteError(f"razor: {value.name} does not carry the T + 1 entries of the layout")
            return
        local = next(v for v in model.graph.inputs if v.name == slot_input(0))
        size = self.method.local_capacity(self.layout.layers[0].cache_inputs[0].shape[2])
        for index in range(len(self.layout.layers)):
            parts = [
                v for v in model.graph.inputs if v.name in {f"cache_{kind}_{index}{LOCAL}" for kind in ("key", "value")}
            ]
            if self.flags(index).all() or (
                len(parts) == 2 and all(v.shape[2] == size and local in _ancestors(_write(v).inputs[1]) for v in parts)
            ):
                continue
            raise GraphRewriteError(
                f"razor: layer {index}'s non-retrieval heads lack {size}-slot caches written at {local.name}"
            )


@register("export", RazorAttention)
def rewrite(graphs: dict[str, ir.Model], method: RazorAttention) -> dict[str, ir.Model]:
    """RazorAttention's export: the prompt cache laid out by head class in prefill, a cache tensor, write slot and
    mask per head class and layer in the fixed decode graph (no growing form)."""
    for key in ("prefill", "decode"):
        run_passes(graphs[key], [HeadClassCachePass(method)])
    return graphs


def _replace(values: list[ir.Value], old: ir.Value, new: list[ir.Value]) -> None:
    """Put ``new`` where ``old`` is in the graph's input or output list."""
    at = values.index(old)
    values[at : at + 1] = new


def _write(cache: ir.Value) -> ir.Node:
    """The ``ScatterND`` that writes the cache input ``cache``."""
    return next(node for node, _ in cache.uses() if node.op_type == "ScatterND")
