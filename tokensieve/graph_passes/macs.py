"""Multiply-accumulate count of an ONNX graph (analysis, no rewrite), per sample.

Counts the ops that dominate transformer cost, from annotated shapes: ``MatMul`` (incl. batched), ``Gemm``,
``Conv`` and the fused ``Attention`` op (``2·B·H·Nq·Nk·d``). Element-wise ops, softmax and norms are not counted
(the usual convention). Inserted selection subgraphs (CLS-row scores, one-hot merges) are ``MatMul``\\ s and so
are counted: the MAC-limit speedup ``baseline / reduced`` includes their cost. A symbolic batch axis counts as 1;
a static batch is divided out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx_ir as ir


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
        elif d.value is not None:  # symbolic: "batch" -> 1, "batch*6" -> 6
            out.append(math.prod(int(t) for t in d.value.split("*") if t.isdigit()))
        else:
            return None
    return out


def _broadcast_batch(a: Sequence[int], b: Sequence[int]) -> int:
    a, b = list(a), list(b)
    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + a, [1] * (n - len(b)) + b
    return math.prod(max(x, y) for x, y in zip(a, b, strict=True))


def node_macs(node: ir.Node) -> int:
    op = node.op_type
    if op == "MatMul":
        a, b = _dims(node.inputs[0]), _dims(node.inputs[1])
        if a is None or b is None:
            return 0
        if len(a) == 1:
            a = [1, *a]
        if len(b) == 1:
            b = [*b, 1]
        return _broadcast_batch(a[:-2], b[:-2]) * a[-2] * a[-1] * b[-1]
    if op == "Gemm":
        out, a = _dims(node.outputs[0]), _dims(node.inputs[0])
        if out is None or a is None:
            return 0
        k = a[0] if node.attributes.get_int("transA", 0) else a[1]
        return out[0] * out[1] * k
    if op == "Conv":
        out, w = _dims(node.outputs[0]), _dims(node.inputs[1])
        if out is None or w is None:
            return 0
        return math.prod(out) * math.prod(w[1:])
    if op == "Attention":
        q, k = _dims(node.inputs[0]), _dims(node.inputs[1])
        if q is None or k is None or len(q) != 4:
            return 0
        return 2 * q[0] * q[1] * q[2] * k[2] * q[3]
    return 0


def count_macs(model: ir.Model) -> int:
    """MACs per sample of the main graph."""
    total = sum(node_macs(node) for node in model.graph)
    first = model.graph.inputs[0].shape if model.graph.inputs else None
    batch = first[0] if first is not None and len(first) and isinstance(first[0], int) else 1
    return total // max(1, batch)
