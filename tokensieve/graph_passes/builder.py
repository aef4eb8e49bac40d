"""Node builder for insertion passes: names, provenance metadata and opset-aware op forms in one place.

Every node a tokensieve pass creates carries ``tokensieve.site`` / ``tokensieve.method`` metadata and a name under
``tokensieve/<site>/`` so inserted subgraphs are recognisable in Netron, Polygraphy and TensorRT logs. Reductions
are emitted in the form the model's opset wants (``axes`` as an attribute before opset 18 for ReduceMean/ReduceMax,
as an input from 18 on), so the same pass works on opset-14 graphs from the legacy exporter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

SITES_KEY = "tokensieve.sites"  # model metadata: JSON list of the sites passes inserted
_AXES_AS_INPUT_SINCE = {
    "ReduceSum": 13,
    "ReduceMean": 18,
    "ReduceMax": 18,
    "ReduceMin": 18,
    "ReduceProd": 18,
    "ReduceL2": 18,
}


class NodeBuilder:
    """Collects new nodes and initializers for one insertion site."""

    def __init__(self, model: ir.Model, prefix: str, metadata: dict[str, str]):
        self.graph = model.graph
        self.opset = model.opset_imports.get("", 18)
        self.prefix = prefix
        self.metadata = metadata
        self.nodes: list[ir.Node] = []
        self.exposed: dict[str, str] = {}
        self._count = 0

    @classmethod
    def for_site(cls, model: ir.Model, layer: int, method: str) -> NodeBuilder:
        return cls(model, f"tokensieve/site{layer}", {"tokensieve.site": str(layer), "tokensieve.method": method})

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, array: np.ndarray | Sequence[int] | float, hint: str = "const", dtype=np.int64) -> ir.Value:
        """A new initializer (not shared with anything else in the graph)."""
        name = self._name(hint)
        value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array, dtype=dtype), name=name))
        tensor = value.const_value
        value.shape, value.dtype = ir.Shape(tensor.shape), tensor.dtype
        self.graph.register_initializer(value)
        return value

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        hint: str | None = None,
        num_outputs: int = 1,
        **attributes,
    ) -> ir.Value | list[ir.Value]:
        name = self._name(hint or op_type)
        node = ir.Node(
            "",
            op_type,
            inputs,
            attributes=ir.convenience.convert_attributes(attributes),
            num_outputs=num_outputs,
            name=name,
            metadata_props=dict(self.metadata),
        )
        for i, out in enumerate(node.outputs):
            out.name = f"{name}:{i}" if num_outputs > 1 else name
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else list(node.outputs)

    def reduce(self, op_type: str, x: ir.Value, axes: Sequence[int], keepdims: bool) -> ir.Value:
        if self.opset >= _AXES_AS_INPUT_SINCE[op_type]:
            return self.op(op_type, [x, self.const(list(axes), "axes")], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))

    def slice(self, x: ir.Value, start: int, end: int, axis: int) -> ir.Value:
        return self.op("Slice", [x, self.const([start], "start"), self.const([end], "end"), self.const([axis], "axis")])

    def unsqueeze(self, x: ir.Value, axes: Sequence[int]) -> ir.Value:
        return self.op("Unsqueeze", [x, self.const(list(axes), "axes")])

    def expose(self, value: ir.Value, role: str) -> ir.Value:
        """Give ``value`` the stable name ``<prefix>/<role>`` so parity can read it as a debug output."""
        value.name = f"{self.prefix}/{role}"
        self.exposed[role] = value.name
        return value

    def ascending(self, indices: ir.Value, count: ir.Value, dims: list) -> ir.Value:
        """``indices`` (int64, ``count`` along the last axis) sorted ascending: ``TopK(largest=0)`` on their float
        cast (exact below 2**24), so TensorRT needs no integer sort."""
        real, i64 = ir.DataType.FLOAT, ir.DataType.INT64
        as_float = typed(self.op("Cast", [indices], to=real), dims, real)
        order, order_index = self.op("TopK", [as_float, count], "ascending", 2, axis=-1, largest=0, sorted=1)
        typed(order, dims, real)
        typed(order_index, dims, i64)
        return typed(self.op("Cast", [order], to=i64), dims, i64)

    def insert_after(self, anchor: ir.Node) -> None:
        self.graph.insert_after(anchor, self.nodes)


def typed(value: ir.Value, dims: list, dtype: ir.DataType) -> ir.Value:
    """Annotate a new value's shape and type (the decoder passes keep every new value typed for the lint)."""
    value.shape, value.dtype = ir.Shape(dims), dtype
    return value


def redirect_uses(old: ir.Value, new: ir.Value, uses: Sequence[tuple[ir.Node, int]]) -> None:
    """Point the recorded ``uses`` of ``old`` (taken before the new nodes existed) and graph outputs at ``new``."""
    for node, index in uses:
        node.replace_input_with(index, new)
    graph = new.graph or old.graph
    if graph is not None:
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new


def read_sites(model: ir.Model) -> list[dict]:
    """The sites recorded in the model's ``tokensieve.sites`` metadata."""
    return json.loads(model.metadata_props.get(SITES_KEY, "[]"))


def record_site(model: ir.Model, site: dict) -> None:
    model.metadata_props[SITES_KEY] = json.dumps([*read_sites(model), site])
