"""Graph pass: remove all-zero additive attention masks.

Matches: ``Add(logits, mask)`` nodes on the path into an attention ``Softmax`` where ``mask`` is computed from
constants and tensor shapes only (no data reaches it). Hugging Face models exported with ``transformers`` 5 carry
such a mask even for vision towers without padding: ``Where(all_true[B, 1, N, N], 0, -inf)``, expanded to the
batch when the batch axis is dynamic.

Inserts nothing: the mask subgraph is evaluated with ONNX's reference evaluator (for batch sizes 1 and 2, the only
symbolic axis its shapes can carry); when it is all zeros and broadcasting it does not enlarge the logits, the
``Add`` is bypassed and removed.

Why: such a mask bakes the token count into an ``N x N`` constant, which no token-reduction pass can retarget, and
it costs an ``Add`` over the attention matrix in every block. Removing it is exact (adding 0.0).

Preconditions: shapes annotated. Postconditions: no attention ``Add`` whose second operand is a constant zero
tensor remains; the graph computes the same values.
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


def _always_zero(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node], leaves: list[ir.Value]) -> bool:
    """Evaluate the mask for batch sizes 1 and 2 (the only symbolic axis shapes may carry) and check it is 0."""
    if value.const_value is not None:  # already folded by the exporter
        return value.const_value.size <= _SIZE_LIMIT and bool(np.all(value.const_value.numpy() == 0))
    order = {node: i for i, node in enumerate(graph)}
    nodes = sorted(nodes, key=order.__getitem__)
    consts = {v for n in nodes for v in n.inputs if v is not None and v.const_value is not None}
    if any(c.const_value.size > _SIZE_LIMIT for c in consts):
        return False
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [ir.serde.serialize_node(n) for n in nodes],
            "mask",
            [onnx.helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in dict.fromkeys(leaves)],
            [onnx.helper.make_tensor_value_info(value.name, int(value.dtype), None)],
            initializer=[numpy_helper.from_array(c.const_value.numpy(), c.name) for c in consts],
        ),
        opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in graph.opset_imports.items()],
    )
    evaluator = ReferenceEvaluator(proto)
    for batch in (1, 2):
        feeds = {}
        for leaf in dict.fromkeys(leaves):
            if leaf.shape is None:
                return False
            dims = [d if isinstance(d, int) else batch for d in leaf.shape]
            feeds[leaf.name] = np.zeros(dims, dtype=leaf.dtype.numpy())
        (mask,) = evaluator.run(None, feeds)
        if mask.size > _SIZE_LIMIT or not np.all(mask == 0):
            return False
    return True


def _mask_adds(graph: ir.Graph) -> list[tuple[ir.Node, int]]:
    found = []
    for node in graph:
        if node.op_type != "Softmax":
            continue
        value = node.inputs[0]
        while (producer := value.producer()) is not None and producer.op_type in _LOGIT_OPS:
            data = None
            for i, v in enumerate(producer.inputs):
                sub = _mask_subgraph(v) if v is not None else None
                if producer.op_type == "Add" and sub is not None and _always_zero(graph, v, *sub):
                    found.append((producer, i))
                elif sub is None:
                    data = v
            if data is None:
                break
            value = data
    return found


class DropZeroMaskPass(ir.passes.InPlacePass):
    """Bypass ``Add(logits, 0-mask)`` in attention (see module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for add, index in _mask_adds(model.graph):
            data = add.inputs[1 - index]
            if data.shape is None or add.outputs[0].shape != data.shape:
                continue
            add.outputs[0].replace_all_uses_with(data)
            modified = True
        if modified:
            RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)
