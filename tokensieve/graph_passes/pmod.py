"""Graph pass: p-MoD's Mixture-of-Depths layers inside an MLLM **prefill** graph.

Matches: the decoder layers of a prefill graph (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`, cache
form ``none``: inputs ``inputs_embeds [1, T, D]`` and ``position_ids [1, T]``, keys/values leaving as
``present_*``); the MoD layers are :meth:`tokensieve.methods.pmod.PMoD.mod_layers`.

Inserts (semantics: :mod:`tokensieve.methods.pmod`):

* a graph input ``image_positions [I]`` (int64, the image tokens' sequence positions; empty without an image);
* the priority of the image tokens: training-free, layer ``first - 1``'s ``Softmax`` output (the probabilities the
  eager-attention graph materialises) on the image columns (``Gather``), mean over heads, summed over the rows after
  the image (:func:`tokensieve.graph_passes.image_attention.rows_after_image`), shared by every MoD layer; with
  routers, per MoD layer ``w = 0.2 * tanh(MatMul(h, W) + b) + 1`` on the stream entering it;
* per MoD layer ``l``: a priority over all ``T`` positions (2.0 for text, above any image priority;
  ``ScatterElements`` without reduction) -> ``TopK(T - I + k)`` with ``k = (I * num) // den`` on shapes (``num/den``
  the float32 ratio) -> ascending (``TopK(largest=0)``) -> graph output ``group_positions_<g>`` (``g``: the MoD
  layer's rank, its decode cache group); ``Gather`` of the stream and of ``position_ids``; the layer's own nodes
  read the gathered stream, and what they share with the other layers (RoPE ``cos``/``sin``, the causal mask,
  ``repeat_kv`` shapes) is re-derived from the gathered positions and the shorter length
  (:func:`tokensieve.graph_passes.rederive.rederive`); the layer's output goes back into the full stream with
  ``ScatterElements`` (no reduction) over the stream entering it (routers: over ``w * h``, and the layer's MLP
  output is multiplied by ``w`` of the processed tokens, 1 for text).

Preconditions (``requires``): a prefill graph with those inputs and at least one MoD layer; the scoring layer's
logits are ``Q·Kᵀ`` plus the causal mask. Postconditions (``ensures``): ``present_*`` of every MoD layer carry
that layer's processed length (an exact expression of ``sequence`` and ``image_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from tokensieve.errors import GraphRewriteError, MethodSpecError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.builder import NodeBuilder, record_site, redirect_uses, typed
from tokensieve.graph_passes.image_attention import rows_after_image
from tokensieve.graph_passes.locate_decoder import (
    DecoderLayer,
    DecoderLayout,
    graph_input,
    image_positions_input,
    locate_decoder,
    logits_matmul,
    scoring_layout,
)
from tokensieve.graph_passes.rederive import downstream, rederive
from tokensieve.graph_passes.split_cache_slot import SplitCacheSlotPass, group_output
from tokensieve.methods.faces import register
from tokensieve.methods.pmod import PMoD

IMAGE_AXIS = "image_tokens"
TEXT_PRIORITY = 2.0  # above any image priority (attention sums over rows are means <= 1; router weights < 1.2)


def router_key(layer: int, part: str) -> str:
    """The official checkpoint's name of MoD layer ``layer``'s router ``weight`` / ``bias``."""
    return f"model.layers.{layer}.router.router.{part}"


def load_routers(path: str, layers: list[int], hidden: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (weight [1, hidden], bias [1])}`` from an ``.npz`` of router weights (bias 0 when absent)."""
    with np.load(path) as data:
        missing = [router_key(i, "weight") for i in layers if router_key(i, "weight") not in data]
        if missing:
            raise MethodSpecError(
                f"pmod: the router file {path} lacks {', '.join(missing)}; it needs one Linear(hidden -> 1) per MoD "
                f"layer {layers} under model.layers.<l>.router.router.weight (and .bias)"
            )
        routers = {}
        for i in layers:
            weight = np.asarray(data[router_key(i, "weight")], np.float32).reshape(1, -1)
            bias = data[router_key(i, "bias")] if router_key(i, "bias") in data else np.zeros(1)
            if weight.shape[1] != hidden:
                raise MethodSpecError(
                    f"pmod: router {router_key(i, 'weight')} has {weight.shape[1]} inputs; this decoder's hidden "
                    f"size is {hidden}"
                )
            routers[i] = (weight, np.asarray(bias, np.float32).reshape(1))
    return routers


def processed_dim(method: PMoD, layer: int, layers: int, sequence: str) -> str:
    """MoD layer ``layer``'s processed length as an exact expression of the input axes."""
    ratio = method.ratio(layer, layers)
    return f"{sequence}-{IMAGE_AXIS}+({IMAGE_AXIS}*{ratio.numerator})//{ratio.denominator}"


@dataclass
class _Shared:
    """What every MoD layer's rewrite reads: the graph inputs and the shape-derived counts."""

    embeds: ir.Value
    positions: ir.Value
    image: ir.Value
    length: ir.Value  # [1] T
    image_count: ir.Value  # [1] I
    text_count: ir.Value  # [1] T - I
    score: ir.Value | None  # [I] training-free priority of the image tokens


class PModPass(ir.passes.InPlacePass):
    """Run p-MoD's MoD layers on the chosen tokens of a prefill graph (see module docstring)."""

    def __init__(self, method: PMoD, routers: dict[int, tuple[np.ndarray, np.ndarray]] | None = None):
        super().__init__()
        self.method, self.routers = method, routers
        self.layout: DecoderLayout | None = None
        self.mod: list[int] = []

    def requires(self, model: ir.Model) -> None:
        self.layout = scoring_layout(model, 0, "pmod")
        self.mod = self.method.check_layers(len(self.layout.layers))
        if self.routers is None and logits_matmul(self.layout.layers[self.mod[0] - 1].softmax) is None:
            raise GraphRewriteError(f"pmod: layer {self.mod[0] - 1}'s attention logits are not a Q·Kᵀ MatMul")
        for name in ("inputs_embeds", "position_ids"):
            graph_input(model.graph, name, "pmod")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        b = self._builder(model, "shared", self.mod[0])
        shared = self._shared(b, graph)
        graph.extend(b.nodes)
        kept = []
        for group in reversed(range(len(self.mod))):  # last first: each layer's stream values are still the originals
            kept.insert(0, self._mod_layer(model, shared, group))
            TopologicalSortPass()(model)
        graph.outputs.extend(kept)
        exposed = {value.name: value.name for value in kept}
        record_site(model, {"layer": self.mod[0], "method": "pmod", "mod_layers": self.mod, "exposed": exposed})
        return ir.passes.PassResult(model, modified=True)

    def _builder(self, model: ir.Model, tag: str, layer: int) -> NodeBuilder:
        metadata = {"tokensieve.site": str(layer), "tokensieve.method": "pmod"}
        return NodeBuilder(model, f"tokensieve/pmod/{tag}", metadata)

    def _shared(self, b: NodeBuilder, graph: ir.Graph) -> _Shared:
        i64 = ir.DataType.INT64
        embeds, positions = graph_input(graph, "inputs_embeds", "pmod"), graph_input(graph, "position_ids", "pmod")
        image = image_positions_input(graph)
        length = typed(b.op("Shape", [positions], start=1, end=2), [1], i64)
        image_count = typed(b.op("Shape", [image]), [1], i64)
        text_count = typed(b.op("Sub", [length, image_count], "text_count"), [1], i64)
        score = None if self.routers else self._attention_score(b, image)
        return _Shared(embeds, positions, image, length, image_count, text_count, score)

    def _attention_score(self, b: NodeBuilder, image: ir.Value) -> ir.Value:
        """``[I]``: the scoring layer's head-mean probabilities on the image columns, summed over the rows after
        the image."""
        probs = self.layout.layers[self.mod[0] - 1].softmax.outputs[0]  # [1, H, T, T]
        seq, heads, real = probs.shape[2], self.layout.heads, probs.dtype
        columns = typed(b.op("Gather", [probs, image], "image_columns", axis=3), [1, heads, seq, IMAGE_AXIS], real)
        head_mean = typed(b.reduce("ReduceMean", columns, [0, 1], keepdims=False), [seq, IMAGE_AXIS], real)
        weight, _ = rows_after_image(b, image, probs)
        weight_column = typed(b.op("Unsqueeze", [weight, b.const([1])]), [seq, 1], real)
        after = typed(b.op("Mul", [head_mean, weight_column], "rows_after_image"), [seq, IMAGE_AXIS], real)
        return typed(b.reduce("ReduceSum", after, [0], keepdims=False), [IMAGE_AXIS], real)

    def _router_weight(self, b: NodeBuilder, layer: DecoderLayer, shared: _Shared) -> ir.Value:
        """``[I]``: ``0.2 * tanh(router(h)) + 1`` of the image tokens entering ``layer``."""
        stream, real = layer.stream_in, layer.stream_in.dtype
        seq = stream.shape[1]
        weight, bias = self.routers[layer.index]
        dtype = real.numpy()
        logit = typed(b.op("MatMul", [stream, b.const(weight.T, "router_weight", dtype)]), [1, seq, 1], real)
        logit = typed(b.op("Add", [logit, b.const(bias, "router_bias", dtype)], "router_logit"), [1, seq, 1], real)
        flat = typed(b.op("Reshape", [logit, b.const([-1])]), [seq], real)
        image_logit = typed(b.op("Gather", [flat, shared.image], axis=0), [IMAGE_AXIS], real)
        tanh = typed(b.op("Tanh", [image_logit]), [IMAGE_AXIS], real)
        scaled = typed(b.op("Mul", [tanh, b.const(0.2, "tanh_scale", dtype)]), [IMAGE_AXIS], real)
        return typed(b.op("Add", [scaled, b.const(1.0, "tanh_bias", dtype)], "router_w"), [IMAGE_AXIS], real)

    def _over_sequence(self, b: NodeBuilder, shared: _Shared, fill: float, values: ir.Value, seq, real) -> ir.Value:
        """``[T]``: ``fill`` at text positions, ``values [I]`` at the image positions."""
        base = typed(b.op("Expand", [b.const(fill, "fill", dtype=real.numpy()), shared.length]), [seq], real)
        return typed(b.op("ScatterElements", [base, shared.image, values], axis=0), [seq], real)

    def _select(self, b: NodeBuilder, shared: _Shared, priority: ir.Value, layer: int, kept: str) -> ir.Value:
        """``[T_l]`` ascending: every text position and the top ``k`` image positions by ``priority [T]``."""
        i64, real = ir.DataType.INT64, priority.dtype
        ratio = self.method.ratio(layer, len(self.layout.layers))
        scaled = typed(b.op("Mul", [shared.image_count, b.const([ratio.numerator])]), [1], i64)
        image_kept = typed(b.op("Div", [scaled, b.const([ratio.denominator])]), [1], i64)
        count = typed(b.op("Add", [shared.text_count, image_kept], "processed_count"), [1], i64)
        values, top = b.op("TopK", [priority, count], "select", num_outputs=2, largest=1, sorted=1)
        typed(values, [kept], real)
        typed(top, [kept], i64)
        return b.ascending(top, count, [kept])

    def _mod_layer(self, model: ir.Model, shared: _Shared, group: int) -> ir.Value:
        """Run MoD layer ``mod[group]`` on its chosen tokens; the processed positions (a new graph output)."""
        graph, index = model.graph, self.mod[group]
        layer = self.layout.layers[index]
        stream, out = layer.stream_in, layer.stream_out
        seq, width, real = stream.shape[1], stream.shape[2], stream.dtype
        region = downstream(stream) - downstream(out)
        inner = [(n, i) for n, i in stream.uses() if n in region]
        outer = list(out.uses())
        kept = processed_dim(self.method, index, len(self.layout.layers), str(seq))
        b = self._builder(model, f"layer{index}", index)
        weight = self._router_weight(b, layer, shared) if self.routers else None
        image_priority = shared.score if weight is None else weight
        priority = self._over_sequence(b, shared, TEXT_PRIORITY, image_priority, seq, real)
        keep = self._select(b, shared, priority, index, kept)
        keep.name = group_output(group)
        sub = typed(b.op("Gather", [stream, keep], "processed", axis=1), [1, kept, width], real)
        positions = shared.positions
        rows = positions.shape[0]
        sub_positions = typed(b.op("Gather", [positions, keep], "position_ids", axis=1), [rows, kept], positions.dtype)
        base, through = stream, [sub]
        if weight is not None:
            full = self._over_sequence(b, shared, 1.0, weight, seq, real)
            base = self._weigh(b, stream, full, [1, seq, width])
            processed = typed(b.op("Gather", [full, keep], axis=0), [kept], real)
            through.append(self._weigh_mlp(b, layer, processed, kept))
        index_3d = typed(b.op("Unsqueeze", [keep, b.const([0, 2])]), [1, kept, 1], ir.DataType.INT64)
        spread = typed(b.op("Expand", [index_3d, b.op("Shape", [sub])]), [1, kept, width], ir.DataType.INT64)
        typed(spread.producer().inputs[1], [3], ir.DataType.INT64)
        merged = typed(b.op("ScatterElements", [base, spread, out], "stream_out", axis=1), [1, seq, width], real)
        graph.extend(b.nodes)
        redirect_uses(stream, sub, inner)
        redirect_uses(out, merged, outer)
        substitutes = {shared.embeds: sub, shared.positions: sub_positions}
        prefix = f"tokensieve/pmod/layer{index}/rederived"
        clones = rederive(graph, region, substitutes, through, prefix, shape_only=frozenset([shared.embeds]))
        for node in region | set(clones):
            for value in node.outputs:
                if value.shape is not None:
                    value.shape = ir.Shape([kept if d == seq else d for d in value.shape])
        return keep

    def _weigh(self, b: NodeBuilder, x: ir.Value, weight: ir.Value, dims: list) -> ir.Value:
        """``x [1, n, D] * weight [n]`` per token."""
        column = typed(b.op("Unsqueeze", [weight, b.const([0, 2])]), [1, dims[1], 1], x.dtype)
        return typed(b.op("Mul", [x, column], "weighted"), dims, x.dtype)

    def _weigh_mlp(self, b: NodeBuilder, layer: DecoderLayer, weight: ir.Value, kept: str) -> ir.Value:
        """The layer's MLP output times ``weight [T_l]`` before the residual ``Add`` (STRing); the weighted value."""
        add = layer.stream_out.producer()
        slot = next(i for i, v in enumerate(add.inputs) if v is not layer.post_attention)
        mlp = add.inputs[slot]
        weighted = self._weigh(b, mlp, weight, [1, kept, mlp.shape[2]])
        add.replace_input_with(slot, weighted)
        return weighted

    def ensures(self, model: ir.Model) -> None:
        outputs = {v.name: v for v in model.graph.outputs}
        for group, index in enumerate(self.mod):
            kept = str(outputs[group_output(group)].shape[0])
            for value in self.layout.layers[index].cache_outputs:
                if value.shape is None or str(value.shape[2]) != kept:
                    raise GraphRewriteError(f"pmod: {value.name} does not carry layer {index}'s processed positions")


@register("export", PMoD)
def rewrite(graphs: dict[str, ir.Model], method: PMoD) -> dict[str, ir.Model]:
    """p-MoD's export: the prefill graph runs the MoD layers on their chosen tokens; in the decode graphs every MoD
    layer gets its own cache slot input (it caches only the prompt positions it processed)."""
    prefill = graphs["prefill"]
    layout = locate_decoder(prefill)
    mod = method.check_layers(len(layout.layers))
    routers = None
    if method.routers is not None:
        routers = load_routers(method.routers, mod, layout.layers[0].stream_in.shape[2])
    run_passes(prefill, [PModPass(method, routers)])
    for key in ("decode", "decode_growing"):
        if key in graphs:
            run_passes(graphs[key], [SplitCacheSlotPass(first, group) for group, first in enumerate(mod)])
    return graphs
