"""Locate the layers of a decoder graph (an MLLM's prefill / decode step): the sites later passes insert into.

Analysis, not a rewrite: :func:`locate_decoder` returns a :class:`DecoderLayout`. Per layer, in order:

* the attention core: a ``Softmax`` over the logits of a ``MatMul`` of the query operand and the transposed key
  operand (causal or cache mask added in between);
* ``query`` / ``key``: Q and K **after RoPE**, found by walking up from the logits ``MatMul`` through scaling,
  layout ops and GQA's ``repeat_kv`` (``Unsqueeze``/``Expand``/``Reshape``) and through the cache: a ``ScatterND``
  (fixed-capacity write: its ``updates`` input is the new key) or a ``Concat`` with a graph input (growing cache);
* ``value``: V as it enters the cache;
* the cache sites: the graph inputs that hold this layer's cache (``cache_key_<i>`` / ``past_key_<i>``), the nodes
  that write them (``ScatterND`` / ``Concat``), and the graph outputs that carry them on (``updated_*``,
  ``present_*``; prefill's ``present_*`` come straight from the new keys/values);
* the residual stream ``[1, T, D]`` entering the layer, after attention (the point between attention and MLP, where
  FastV-style dropping cuts), and leaving the layer.

The sequence axis of the residual stream is axis 1; which positions hold the image is a host fact (the runs of
``image_token_id`` in ``input_ids``; LLaVA: a fixed count, LLaVA-NeXT: per image size) that the manifest records.
Works structurally; the dynamo exporter's name scopes, when present, name the layers (``layers.3``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from tokensieve.errors import GraphRewriteError, LocateError
from tokensieve.graph_passes.locate import _ancestors, _is_constant, _residual_add, _scopes, _static_dims

# ops between Q/K (after RoPE) and the logits MatMul: layout and GQA repeat_kv (data = input 0), and scaling
_LAYOUT = frozenset({"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Cast", "Identity"})
_SCALING = frozenset({"Mul", "Div"})


@dataclass
class DecoderLayer:
    index: int
    name: str
    stream_in: ir.Value
    post_attention: ir.Value
    stream_out: ir.Value
    query: ir.Value
    key: ir.Value
    value: ir.Value
    softmax: ir.Node
    cache_inputs: list[ir.Value] = field(default_factory=list)
    cache_writes: list[ir.Node] = field(default_factory=list)
    cache_outputs: list[ir.Value] = field(default_factory=list)

    def summary(self) -> dict:
        def shape(value: ir.Value):
            return _static_dims(value)

        return {
            "index": self.index,
            "name": self.name,
            "stream_in": self.stream_in.name,
            "post_attention": self.post_attention.name,
            "stream_out": self.stream_out.name,
            "query": {"value": self.query.name, "shape": shape(self.query)},
            "key": {"value": self.key.name, "shape": shape(self.key)},
            "value": {"value": self.value.name, "shape": shape(self.value)},
            "softmax": self.softmax.name,
            "cache_read": [v.name for v in self.cache_inputs],
            "cache_write": [f"{n.op_type}:{n.name}" for n in self.cache_writes],
            "cache_out": [v.name for v in self.cache_outputs],
        }


@dataclass
class DecoderLayout:
    layers: list[DecoderLayer]
    cache: str  # "fixed" | "growing" | "none" (prefill: keys/values leave as present_* outputs)
    heads: int
    kv_heads: int
    head_dim: int
    uses_metadata: bool

    def summary(self) -> dict:
        return {
            "layers": len(self.layers),
            "cache": self.cache,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "sequence_axis": 1,
            "located_with": "name_scopes metadata + structure" if self.uses_metadata else "structure",
            "sites": [layer.summary() for layer in self.layers],
        }


def _trace(
    value: ir.Value, graph_inputs: set[ir.Value], graph_outputs: set[ir.Value]
) -> tuple[ir.Value, list[ir.Value], list[ir.Node]]:
    """Walk up from a logits / PV operand to the tensor this step computes, in cache layout ``[B, H_kv, T, d]``:
    the ``updates`` of a cache write, a ``present_*`` output, or where the layout ops end (Q / K after RoPE).
    Returns (that tensor, cache inputs read, cache-writing nodes)."""
    while (producer := value.producer()) is not None:
        op = producer.op_type
        if op == "ScatterND" and len(producer.inputs) == 3:  # fixed cache: (cache, indices, updates)
            return producer.inputs[2], [_cache_input(producer.inputs[0], graph_inputs)], [producer]
        if op == "Concat" and any(v in graph_inputs for v in producer.inputs):  # growing cache: cat(past, new)
            new = [v for v in producer.inputs if v not in graph_inputs]
            past = [v for v in producer.inputs if v in graph_inputs]
            return (new[0] if len(new) == 1 else value), past, [producer]
        if value in graph_outputs:  # prefill's present_*: the new keys/values leave the graph here
            break
        data = [v for v in producer.inputs if v is not None and not _is_constant(v)]
        if op in _LAYOUT:
            value = producer.inputs[0]
        elif op in _SCALING and len(data) == 1:
            value = data[0]
        else:
            break
    return value, [], []


def _cache_input(value: ir.Value, graph_inputs: set[ir.Value]) -> ir.Value:
    while value not in graph_inputs:
        producer = value.producer()
        if producer is None or producer.op_type not in _LAYOUT:
            raise LocateError(f"the cache written by ScatterND does not come from a graph input ({value.name})")
        value = producer.inputs[0]
    return value


def logits_matmul(softmax: ir.Node) -> ir.Node | None:
    value = softmax.inputs[0]
    for _ in range(8):
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type == "MatMul":
            return producer
        if producer.op_type not in ("Add", "Mul", "Div", "Sub", "Cast"):
            return None
        data = [v for v in producer.inputs if v is not None and v.producer() is not None and not _is_constant(v)]
        # the mask is data too (it depends on the inputs): follow the operand that comes from a MatMul chain
        value = next((v for v in data if v.producer().op_type in ("MatMul", "Mul", "Div", "Cast")), None)
        if value is None:
            return None
    return None


def _forward_outputs(value: ir.Value, graph_outputs: set[ir.Value]) -> list[ir.Value]:
    """Graph outputs reached from ``value`` through layout ops, a cache write (ScatterND / Concat) or a cache
    compression (``GatherElements`` along the sequence, SnapKV)."""
    found, frontier = [], [value]
    for _ in range(8):
        nxt = []
        for v in frontier:
            if v in graph_outputs:
                found.append(v)
            for node, _ in v.uses():
                if node.op_type in ("Transpose", "Reshape", "ScatterND", "Concat", "Identity", "GatherElements"):
                    nxt.extend(node.outputs)
        frontier = nxt
    return list(dict.fromkeys(found))


def locate_decoder(model: ir.Model) -> DecoderLayout:
    """Find every decoder layer's sites in a prefill or decode graph (shapes must be annotated)."""
    graph = model.graph
    inputs, outputs = set(graph.inputs), set(graph.outputs)
    layers: list[DecoderLayer] = []
    uses_metadata = False
    heads = kv_heads = head_dim = 0
    for node in graph:
        if node.op_type != "Softmax":
            continue
        matmul = logits_matmul(node)
        pv = next((n for n, i in node.outputs[0].uses() if n.op_type == "MatMul" and i == 0), None)
        if matmul is None or pv is None:
            continue
        query, _, _ = _trace(matmul.inputs[0], inputs, outputs)
        key, key_caches, key_writes = _trace(matmul.inputs[1], inputs, outputs)
        value, value_caches, value_writes = _trace(pv.inputs[1], inputs, outputs)
        qd, kd = _static_dims(query), _static_dims(key)
        if qd is None or kd is None or len(qd) != 4 or len(kd) != 4:
            raise LocateError(f"attention {node.name!r}: Q/K after RoPE are not 4-D [B, H, T, d] ({qd}, {kd})")
        found = _residual_add(pv.outputs[0], _ancestors(query))
        if found is None:
            raise LocateError(f"attention {node.name!r}: no residual Add closes the attention branch")
        add, stream_in = found
        mlp_add = next((n for n, _ in add.outputs[0].uses() if n.op_type == "Add"), None)
        if mlp_add is None:
            raise LocateError(f"layer after {add.name!r}: no residual Add closes the MLP branch")
        scopes = _scopes(node)
        name = next((s for s in reversed(scopes or []) if s.count(".") == 1 and s[-1].isdigit()), None)
        uses_metadata |= name is not None
        heads, kv_heads, head_dim = qd[1], kd[1], qd[3]
        layers.append(
            DecoderLayer(
                index=len(layers),
                name=name or f"layer{len(layers)}",
                stream_in=stream_in,
                post_attention=add.outputs[0],
                stream_out=mlp_add.outputs[0],
                query=query,
                key=key,
                value=value,
                softmax=node,
                cache_inputs=key_caches + value_caches,
                cache_writes=key_writes + value_writes,
                cache_outputs=_forward_outputs(key, outputs) + _forward_outputs(value, outputs),
            )
        )
    if not layers:
        raise LocateError("no decoder attention (Softmax over Q·Kᵀ logits followed by a PV MatMul) found in the graph")
    writes = {n.op_type for layer in layers for n in layer.cache_writes}
    cache = "fixed" if "ScatterND" in writes else "growing" if "Concat" in writes else "none"
    return DecoderLayout(layers, cache, heads, kv_heads, head_dim, uses_metadata)


def scoring_layout(model: ir.Model, layer: int, method: str) -> DecoderLayout:
    """The layout of a prefill graph whose decoder layer ``layer`` a method scores from: a typed error when the graph
    is not a prefill graph, has no such layer, or that layer's logits are not a ``Q·Kᵀ`` ``MatMul``."""
    layout = locate_decoder(model)
    if layout.cache != "none":
        raise GraphRewriteError(f"{method}: expected a prefill graph, got a {layout.cache}-cache graph")
    if not 0 <= layer < len(layout.layers):
        raise GraphRewriteError(f"{method}: no decoder layer {layer} to score with")
    if logits_matmul(layout.layers[layer].softmax) is None:
        raise GraphRewriteError(f"{method}: layer {layer}'s attention logits are not a Q·Kᵀ MatMul")
    return layout


def graph_input(graph: ir.Graph, name: str, method: str) -> ir.Value:
    """The graph input ``name`` of a prefill graph a method rewrites (a typed error naming it when absent)."""
    found = next((v for v in graph.inputs if v.name == name), None)
    if found is None:
        raise GraphRewriteError(f"{method}: the graph has no input {name!r}; it applies to an MLLM prefill graph")
    return found


def image_positions_input(graph: ir.Graph) -> ir.Value:
    """Add the graph input ``image_positions [image_tokens]`` (int64): the image tokens' sequence positions."""
    image = ir.Value(name="image_positions", shape=ir.Shape(["image_tokens"]), type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(image)
    return image
