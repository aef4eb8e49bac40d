"""Graph pass: remove all-zero additive attention masks.

Matches: ``Add(logits, mask)`` nodes on the path into an attention ``Softmax`` where ``mask`` is computed from
constants only (no graph input reaches it). Hugging Face models exported with ``transformers`` 5 carry such a mask
even for vision towers without padding: ``Where(all_true[1, 1, N, N], 0, -inf)``.

Inserts nothing: the mask subgraph is constant-folded with onnxscript's folder (limited to those nodes, with
limits large enough for ``N x N`` masks); when the folded mask is all zeros and broadcasting it does not enlarge
the logits, the ``Add`` is bypassed and removed.

Why: such a mask bakes the token count into an ``N x N`` constant, which no token-reduction pass can retarget, and
it costs an ``Add`` over the attention matrix in every block. Removing it is exact (adding 0.0).

Preconditions: shapes annotated. Postconditions: no attention ``Add`` whose second operand is a constant zero
tensor remains; the graph computes the same values.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.optimizer import fold_constants

_LOGIT_OPS = frozenset({"Add", "Mul", "Div", "Sub", "Cast"})
_SIZE_LIMIT = 1 << 24


def _constant_ancestry(value: ir.Value) -> set[ir.Node] | None:
    """Nodes computing ``value`` from constants only; ``None`` when a graph input or unknown value reaches it."""
    nodes: set[ir.Node] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v.const_value is not None:
            continue
        producer = v.producer()
        if producer is None:
            return None
        if producer not in nodes:
            nodes.add(producer)
            stack.extend(i for i in producer.inputs if i is not None)
    return nodes


def _mask_adds(graph: ir.Graph) -> list[tuple[ir.Node, int, set[ir.Node]]]:
    found = []
    for node in graph:
        if node.op_type != "Softmax":
            continue
        value = node.inputs[0]
        while (producer := value.producer()) is not None and producer.op_type in _LOGIT_OPS:
            data = None
            for i, v in enumerate(producer.inputs):
                ancestry = _constant_ancestry(v) if v is not None else None
                if producer.op_type == "Add" and ancestry is not None:
                    found.append((producer, i, ancestry))
                elif ancestry is None:
                    data = v
            if data is None:
                break
            value = data
    return found


class DropZeroMaskPass(ir.passes.InPlacePass):
    """Bypass ``Add(logits, 0-mask)`` in attention (see module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        candidates = _mask_adds(model.graph)
        if not candidates:
            return ir.passes.PassResult(model, modified=False)
        to_fold = set().union(*(nodes for _, _, nodes in candidates))
        fold_constants(
            model,
            input_size_limit=_SIZE_LIMIT,
            output_size_limit=_SIZE_LIMIT,
            should_fold=lambda node: None if node in to_fold else False,
        )
        modified = False
        for add, index, _ in candidates:
            if add.graph is None:
                continue
            mask, data = add.inputs[index], add.inputs[1 - index]
            tensor = ir.convenience.get_const_tensor(mask)
            if tensor is None or data.shape is None or add.outputs[0].shape != data.shape:
                continue
            if not np.all(tensor.numpy() == 0):
                continue
            add.outputs[0].replace_all_uses_with(data)
            modified = True
        RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=modified)
