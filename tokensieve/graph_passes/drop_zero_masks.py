"""Graph pass: remove additive attention-mask terms that cannot change the attention.

Matches: ``Add(logits, mask)`` nodes on the path into an attention ``Softmax`` where ``mask`` is computed from
constants and tensor shapes only (no data reaches it). Hugging Face models exported with ``transformers`` 5 carry
such a mask even for vision towers without padding: ``Where(all_true[B, 1, N, N], 0, -inf)``, expanded to the
batch when the batch axis is dynamic. Also matches, below such an ``Add`` that feeds the ``Softmax`` directly (over
its last axis), a summand of ``mask`` that is finite and constant along the key axis: Hugging Face BEiT adds its
all-true mask cast to float (``+1`` on every logit, expanded to the batch) to its relative position bias.

Inserts nothing: the mask subgraph is evaluated with ONNX's reference evaluator (for batch sizes 1 and 2, the only
symbolic axis its shapes can carry). An all-zero mask whose broadcasting does not enlarge the logits is bypassed
(the ``Add`` removed); a key-constant summand is bypassed in that ``Add``'s input when the logits keep their shape.

Why: such a mask bakes the token count into an ``N x N`` constant (or ties the bias to the input's shape), which no
token-reduction pass can retarget, and it costs an ``Add`` over the attention matrix in every block. Removing it is
exact: adding 0.0, or a constant per query row, leaves every softmax row unchanged.

Preconditions: shapes annotated. Postconditions: no attention ``Add`` whose second operand is a constant zero
tensor remains; the graph computes the same attention probabilities.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes.common import RemoveUnusedNodesPass

_LOGIT_OPS = frozenset({"Add", "Mul", "Div", "Sub", "Cast"})
_SIZE_LIMIT = 1 << 24


def _mask_subgraph(value: ir.Value) -> tuple[list[ir.Node], list[ir.Value]] | None:
    """Nodes computing ``value`` from constants and tensor *shapes* only, and the tensors whose shapes they read;
    ``None`` when data reaches it."""
    nodes: list[ir.Node] = []
    leaves: list[ir.Value] = []
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v.const_value is not None:
            continue
        producer = v.producer()
        if producer is None:
            return None
        if producer in seen:
            continue
        seen.add(producer)
        nodes.append(producer)
        if producer.op_type in ("Shape", "Size"):
            leaves.append(producer.inputs[0])
            continue
        stack.extend(i for i in producer.inputs if i is not None)
    return nodes, leaves


def _evaluate(graph: ir.Graph, value: ir.Value) -> list[np.ndarray] | None:
    """The values of a shape-only ``value`` for batch sizes 1 and 2 (the only symbolic axis shapes may carry);
    ``None`` when data reaches it or it is too large to evaluate."""
    if value.const_value is not None:  # already folded by the exporter
        return [value.const_value.numpy()] if value.const_value.size <= _SIZE_LIMIT else None
    sub = _mask_subgraph(value)
    if sub is None:
        return None
    nodes, leaves = sub
    order = {node: i for i, node in enumerate(graph)}
    nodes = sorted(nodes, key=order.__getitem__)
    consts = {v for n in nodes for v in n.inputs if v is not None and v.const_value is not None}
    if any(c.const_value.size > _SIZE_LIMIT for c in consts):
        return None
    leaves = list(dict.fromkeys(leaves))
    if any(leaf.shape is None for leaf in leaves):
        return None
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes],
            "mask",
            [onnx.helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in leaves],
            [onnx.helper.make_tensor_value_info(value.name, int(value.dtype), None)],
            initializer=[numpy_helper.from_array(c.const_value.numpy(), c.name) for c in consts],
        ),
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in graph.opset_imports.items()],
    )
    evaluator = ReferenceEvaluator(proto)
    values = []
    for batch in (1, 2):
        feeds = {
            leaf.name: np.zeros([d if isinstance(d, int) else batch for d in leaf.shape], dtype=leaf.dtype.numpy())
            for leaf in leaves
        }
        (mask,) = evaluator.run(None, feeds)
        if mask.size > _SIZE_LIMIT:
            return None
        values.append(mask)
    return values


def _always_zero(graph: ir.Graph, value: ir.Value) -> bool:
    values = _evaluate(graph, value)
    return values is not None and all(np.all(v == 0) for v in values)


def _key_constant(graph: ir.Graph, value: ir.Value) -> bool:
    """``value`` is shape-only, finite and constant along its last (key) axis: a per-row softmax offset."""
    values = _evaluate(graph, value)
    return values is not None and all(
        v.ndim >= 1 and np.all(np.isfinite(v)) and np.all(v == v[..., :1]) for v in values
    )


def _mask_adds(graph: ir.Graph) -> list[tuple[ir.Node, int]]:
    found = []
    for node in graph:
        if node.op_type != "Softmax":
            continue
        value = node.inputs[0]
        while (producer := value.producer()) is not None and producer.op_type in _LOGIT_OPS:
            data = None
            for i, v in enumerate(producer.inputs):
                if v is not None and _mask_subgraph(v) is None:
                    data = v
                elif producer.op_type == "Add" and v is not None and _always_zero(graph, v):
                    found.append((producer, i))
            if data is None:
                break
            value = data
    return found


def _broadcast(a: ir.Shape, b: ir.Shape) -> tuple | None:
    """The broadcast of two shapes (dims compared as given; ``None`` when they do not provably broadcast)."""
    a_dims, b_dims = list(a), list(b)
    width = max(len(a_dims), len(b_dims))
    a_dims, b_dims = [1] * (width - len(a_dims)) + a_dims, [1] * (width - len(b_dims)) + b_dims
    out = []
    for x, y in zip(a_dims, b_dims, strict=True):
        if x != y and 1 not in (x, y):
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


_Path = list[tuple[ir.Node, int]]  # (Add, input index) from the logits' Add down the bias's Add tree


def _reshaped(path: _Path, kept: ir.Value) -> list[tuple] | None:
    """The output shapes of the ``Add`` nodes on ``path`` (innermost first) once ``kept`` replaces the input the
    innermost one reads; ``None`` unless the logits keep their shape."""
    if kept.shape is None:
        return None
    shape, shapes = tuple(kept.shape), []
    for node, index in reversed(path):
        other = node.inputs[1 - index]
        shape = _broadcast(other.shape, shape) if other.shape is not None else None
        if shape is None:
            return None
        shapes.append(shape)
    return shapes if shapes[-1] == tuple(path[0][0].outputs[0].shape or ()) else None


def _strip(graph: ir.Graph, path: _Path) -> bool:
    """Bypass one key-constant summand in the bias ``Add`` tree below ``path`` (single-use ``Add`` nodes only)."""
    node, index = path[-1]
    inner = node.inputs[index].producer()
    if inner is None or inner.op_type != "Add":
        return False
    for j, summand in enumerate(inner.inputs):
        shapes = _reshaped(path, inner.inputs[1 - j])
        if shapes is not None and _key_constant(graph, summand):
            node.replace_input_with(index, inner.inputs[1 - j])
            for (n, _), shape in zip(reversed(path), shapes, strict=True):
                n.outputs[0].shape = ir.Shape(shape)
            return True
    return len(inner.outputs[0].uses()) == 1 and any(_strip(graph, [*path, (inner, j)]) for j in range(2))


def _strip_key_constant(graph: ir.Graph) -> bool:
    """Drop the key-constant summands of the shape-only bias added to the logits of every last-axis ``Softmax``
    whose logits nothing else reads."""
    modified = False
    for node in graph:
        add = node.inputs[0].producer() if node.op_type == "Softmax" else None
        if add is None or add.op_type != "Add" or len(add.outputs[0].uses()) != 1:
            continue
        if node.attributes.get_int("axis", -1) not in (-1, len(node.inputs[0].shape or ()) - 1):
            continue
        for index, term in enumerate(add.inputs):
            if _mask_subgraph(term) is not None and add.inputs[1 - index].shape is not None:
                while _strip(graph, [(add, index)]):
                    modified = True
    return modified


class DropZeroMaskPass(ir.passes.InPlacePass):
    """Bypass ``Add(logits, 0-mask)`` and key-constant mask summands in attention (see module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for add, index in _mask_adds(model.graph):
            data = add.inputs[1 - index]
            if data.shape is None or add.outputs[0].shape != data.shape:
                continue
            add.outputs[0].replace_all_uses_with(data)
            modified = True
        modified |= _strip_key_constant(model.graph)
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)
