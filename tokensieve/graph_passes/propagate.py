"""Forward shape propagation after a token-count change, with retargeting of constant Reshape targets.

Exported ViT graphs bake the token count into constants: the dynamo exporter writes ``Reshape(x, [1, 197, 3, 6,
64])``, and one initializer is often shared by every block. When a pass changes the number of tokens at a site,
every downstream Reshape whose target encodes the old count must be rewritten, and only for the downstream uses.

This module re-infers the shape of every value in topological order with ONNX's own per-node inference
(``onnx.shape_inference.infer_node_outputs``), evaluating small shape computations (``Shape -> Gather -> Concat ->
Reshape`` in legacy-exporter graphs, ``Mod`` in a traced ``nn.MultiheadAttention``, float ``sqrt`` of a position
count in a traced position-embedding interpolation) so their values are known. At each Reshape whose (known) target no
longer matches its input's element count, the new target is derived from the old and new input shapes, not from
matching numbers: the output dimension that contains each changed input axis (found by prefix products of the old
shapes) is scaled by the axis' new/old ratio. Constant elements are rewritten in a fresh initializer, shape-derived
elements are left to compute themselves at run time. A ``Split`` with constant sizes along a changed axis gives the
change to its last piece (the leading pieces are special tokens split off ahead of the patches; along a symbolic axis
the last piece is computed from the input's shape). Symbolic dimensions
(dynamic batch) are carried as distinct large prime proxies during the computation and mapped back to their names
afterwards.

Nothing here matches on values such as 197, so a hidden size that happens to equal the token count is never
touched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from tokensieve.errors import GraphRewriteError

_PROXY_PRIMES = (1_000_003, 3_000_017, 5_000_011, 7_000_003, 11_000_027, 13_000_027, 17_000_023, 19_000_013)
_MAX_OFFSET = 65_536  # "past+1": a proxy plus a small constant stays symbolic
# Small ops whose outputs are evaluated when all inputs are known (shape arithmetic).
SHAPE_OPS = frozenset(
    [
        "Shape",
        "Size",
        "Gather",
        "Slice",
        "Concat",
        "Unsqueeze",
        "Squeeze",
        "Cast",
        "Identity",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Equal",
        "Where",
        "Max",
        "Min",
        "ConstantOfShape",
        "Range",
        "Reshape",
        "ReduceProd",
        "Neg",
        "Abs",
        "Expand",
        "Pow",
        "Sqrt",
        "Floor",
        "Ceil",
        "Mod",
    ]
)
_MAX_KNOWN_ELEMENTS = 64
_INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32)
# Float shape arithmetic (``sqrt(num_positions)`` in position-embedding interpolation) is evaluated too, as long as
# no symbolic proxy flows into it (a proxy is only meaningful under integer arithmetic).
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


class _Proxies:
    """Maps symbolic / unknown dimensions to distinct prime integers and back."""

    def __init__(self) -> None:
        self._by_name: dict[str, int] = {}
        self._names: dict[int, str] = {}

    def _new(self, name: str) -> int:
        if len(self._names) >= len(_PROXY_PRIMES):
            raise GraphRewriteError("too many symbolic dimensions to propagate shapes; export with static shapes")
        prime = _PROXY_PRIMES[len(self._names)]  # one per distinct symbol name
        self._names[prime] = name
        return prime

    def _symbol(self, name: str) -> int:
        if name not in self._by_name:
            self._by_name[name] = self._new(name)
        return self._by_name[name]

    def dim(self, d: int | ir.SymbolicDim) -> int | None:
        if isinstance(d, int):
            return d
        if d.value is None:
            return None
        base, offset = _split_offset(d.value)
        if offset:
            inner = self.dim(ir.SymbolicDim(base))
            return None if inner is None else inner + offset
        factors = [t.strip() for t in d.value.split("*")]
        if len(factors) > 1 and all(t.isdigit() or t.isidentifier() for t in factors):  # "batch*12", "12*batch"
            return math.prod(int(t) if t.isdigit() else self._symbol(t) for t in factors)
        return self._symbol(d.value)

    def shape(self, shape: ir.Shape | None) -> tuple[int, ...] | None:
        """Concrete (proxied) dims, or ``None`` when the rank or any dimension is unknown."""
        if shape is None:
            return None
        dims = tuple(self.dim(d) for d in shape)
        return None if None in dims else dims

    def shape_text(self, dims: tuple[int, ...]) -> str:
        return "[" + ", ".join(str(self.unproxy(d)) for d in dims) + "]"

    def unproxy(self, v: int) -> int | str:
        """Concrete int, or a symbolic name (``"batch"``, ``"batch*6"``, ``"past+1"``): an exact multiple of a proxy
        first, else the proxy plus the smallest offset, a single proxy before a multiple (``slots+1``, not
        ``batch*3+9``, which the same number also is)."""
        candidates = []
        for order, (prime, name) in enumerate(self._names.items()):  # ties: the first symbol seen
            factor, offset = divmod(v + _MAX_OFFSET, prime)
            offset -= _MAX_OFFSET
            if factor >= 1 and abs(offset) < _MAX_OFFSET:
                candidates.append((offset != 0, factor != 1, abs(offset), order, name, factor, offset))
        if not candidates:
            return v
        *_, name, factor, offset = min(candidates)
        text = name if factor == 1 else f"{name}*{self.unproxy(factor)}"
        return text if not offset else f"{text}{offset:+d}"


def proxied_dims(*shapes: ir.Shape | None) -> list[tuple[int, ...] | None]:
    """The shapes as integers, symbolic dimensions (``batch``, ``batch*3``) as the same distinct large proxies in
    all of them, so prefix products can be compared (None: an unknown rank or dimension)."""
    proxies = _Proxies()
    return [proxies.shape(shape) for shape in shapes]


def _split_offset(text: str) -> tuple[str, int]:
    """``"past+1"`` -> ``("past", 1)``; ``"batch"`` -> ``("batch", 0)``."""
    text = text.replace(" ", "")
    for sign in "+-":
        base, found, tail = text.rpartition(sign)
        if found and base and tail.isdigit():
            return base, int(tail) if sign == "+" else -int(tail)
    return text, 0


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def containing_axis(old_in: tuple[int, ...], t: int, old_out: tuple[int, ...]) -> int | None:
    """The output axis ``j`` of a Reshape from ``old_in`` to ``old_out`` that contains input axis ``t``:
    ``prod(old_out[:j]) | prod(old_in[:t])`` and ``prod(old_in[:t+1]) | prod(old_out[:j+1])``; None when the
    Reshape splits axis ``t`` across several output axes (a token axis folded into a spatial grid)."""
    before, after = _numel(old_in[:t]), _numel(old_in[: t + 1])
    for j in range(len(old_out)):
        lo, hi = _numel(old_out[:j]), _numel(old_out[: j + 1])
        if before % lo == 0 and hi % after == 0:
            return j
    return None


def retarget_dims(old_in: tuple[int, ...], new_in: tuple[int, ...], old_out: tuple[int, ...]) -> tuple[int, ...]:
    """New Reshape output dims for an input that changed from ``old_in`` to ``new_in`` (same rank): for each changed
    input axis ``t``, the output axis containing it (:func:`containing_axis`) is scaled by ``new_in[t] / old_in[t]``.
    """
    if len(old_in) != len(new_in):
        raise GraphRewriteError(f"rank changed from {old_in} to {new_in}; cannot retarget a Reshape")
    out = list(old_out)
    for t, (o, n) in enumerate(zip(old_in, new_in, strict=True)):
        if o == n:
            continue
        j = containing_axis(old_in, t, old_out)
        if j is None:
            raise GraphRewriteError(
                f"a Reshape splits the changed axis {t} of {old_in} across output dims {old_out}; token reduction "
                "cannot precede a reshape of the token axis into a grid (e.g. a convolutional head) unless the grid "
                "is restored first: export with --restore-grid"
            )
        if (out[j] * n) % o:
            raise GraphRewriteError(f"cannot scale Reshape dim {old_out[j]} by {n}/{o}")
        out[j] = out[j] * n // o
    return tuple(out)


def _type_proto(dtype: ir.DataType, dims: tuple[int, ...] | None) -> onnx.TypeProto:
    return onnx.helper.make_tensor_type_proto(int(dtype), None if dims is None else list(dims))


class _Propagator:
    def __init__(self, model: ir.Model, prev_shapes: Mapping[ir.Value, ir.Shape]):
        self.model = model
        self.graph = model.graph
        self.proxies = _Proxies()
        self.prev_shapes = prev_shapes
        self.known: dict[ir.Value, np.ndarray] = {}
        # For 1-D int values: per element, the constant value it comes from (or None when computed).
        self.origin: dict[ir.Value, list[ir.Value | None]] = {}
        self.old: dict[ir.Value, tuple[int, ...] | None] = {}
        self.rewritten = 0
        self.opset_imports = [
            onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()
        ]

    # -- values ------------------------------------------------------------------------------------------
    def dims(self, value: ir.Value) -> tuple[int, ...] | None:
        return self.proxies.shape(value.shape)

    def old_dims(self, value: ir.Value) -> tuple[int, ...] | None:
        if value in self.prev_shapes:
            return self.proxies.shape(self.prev_shapes[value])
        return self.old.get(value, self.dims(value))

    def set_dims(self, value: ir.Value, dims: tuple[int | None, ...]) -> None:
        value.shape = ir.Shape([None if d is None else self.proxies.unproxy(d) for d in dims])

    def seed_constant(self, value: ir.Value, tensor: ir.TensorProtocol | None) -> None:
        if tensor is None or tensor.dtype not in _INT_TYPES + _FLOAT_TYPES or tensor.size > _MAX_KNOWN_ELEMENTS:
            return
        if tensor.dtype in _FLOAT_TYPES:
            self.known[value] = tensor.numpy().astype(np.float64)
            return
        array = tensor.numpy().astype(np.int64)
        self.known[value] = array
        if array.ndim <= 1:
            self.origin[value] = [value] * max(1, array.size)

    def feed(self, value: ir.Value) -> np.ndarray:
        """The known value of ``value`` in its own element type."""
        return self.known[value].astype(onnx.helper.tensor_dtype_to_np_dtype(int(value.dtype)))

    # -- per node ------------------------------------------------------------------------------------------
    def run(self) -> int:
        for value in self.graph.initializers.values():
            if value.const_value is not None:
                value.dtype = value.const_value.dtype
                value.shape = ir.Shape(value.const_value.shape)
            self.seed_constant(value, value.const_value)
        for value in self._all_values():
            self.old[value] = self.dims(value)
        for node in list(self.graph):
            self.visit(node)
        return self.rewritten

    def _all_values(self) -> Iterable[ir.Value]:
        yield from self.graph.inputs
        yield from self.graph.initializers.values()
        for node in self.graph:
            yield from node.outputs

    def visit(self, node: ir.Node) -> None:
        if node.op_type == "Constant" and node.domain == "":
            self.seed_constant(node.outputs[0], ir.convenience.get_const_tensor(node.outputs[0]))
        if node.domain not in ("", "ai.onnx") or any(
            a.type == ir.AttributeType.GRAPH for a in node.attributes.values()
        ):
            return  # custom-domain and control-flow nodes keep their annotations
        if node.op_type == "Reshape":
            self.retarget_reshape(node)
        if node.op_type == "Split":
            self.retarget_split(node)
        self.infer(node)
        if node.op_type in SHAPE_OPS and node.outputs[0] not in self.known:
            self.evaluate(node)

    def infer(self, node: ir.Node) -> None:
        version = self.model.opset_imports.get(node.domain or "", None)
        try:
            schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=version, domain=node.domain or "")
        except onnx.defs.SchemaError:
            return
        input_types, input_data = {}, {}
        for value in node.inputs:
            if value is None:
                continue
            if value.dtype is None:
                return
            input_types[value.name] = _type_proto(value.dtype, self.dims(value))
            if value in self.known:
                input_data[value.name] = numpy_helper.from_array(self.feed(value), value.name)
        symbolic_k = node.op_type == "TopK" and self._symbolic(node.inputs[1])
        if symbolic_k:  # ONNX checks K against the axis length; a symbolic K is only known to fit
            input_data.pop(node.inputs[1].name, None)
        node_proto = ir.serde.serialize_node(node)
        try:
            inferred = onnx.shape_inference.infer_node_outputs(
                schema, node_proto, input_types, input_data, opset_imports=self.opset_imports
            )
        except (onnx.shape_inference.InferenceError, RuntimeError) as e:
            raise GraphRewriteError(
                f"cannot propagate the new token count through node {node.name!r} ({node.op_type}): "
                f"{str(e).splitlines()[0]}"
            ) from None
        if symbolic_k:
            dims = self.dims(node.inputs[0])
            if dims is not None:
                axis = node.attributes.get_int("axis", -1) % len(dims)
                k = int(self.known[node.inputs[1]].reshape(-1)[0])
                for value in node.outputs:
                    self.set_dims(value, (*dims[:axis], k, *dims[axis + 1 :]))
                node.outputs[1].dtype = ir.DataType.INT64
                node.outputs[0].dtype = node.inputs[0].dtype
            return
        for value in node.outputs:
            tp = inferred.get(value.name)
            if tp is None or not tp.HasField("tensor_type"):
                continue
            if tp.tensor_type.elem_type:
                value.dtype = ir.DataType(tp.tensor_type.elem_type)
            if tp.tensor_type.HasField("shape"):
                self.set_dims(
                    value,
                    tuple(d.dim_value if d.HasField("dim_value") else None for d in tp.tensor_type.shape.dim),
                )

    def _symbolic(self, value: ir.Value | None) -> bool:
        """A known integer value that holds a symbolic (proxy) dimension."""
        return value is not None and value in self.known and bool((self.known[value] >= _PROXY_PRIMES[0]).any())

    def evaluate(self, node: ir.Node) -> None:
        out = node.outputs[0]
        if out.dtype not in (*_INT_TYPES, ir.DataType.BOOL, *_FLOAT_TYPES) or len(node.outputs) != 1:
            return
        if node.op_type == "Shape":
            dims = self.dims(node.inputs[0])
            if dims is None:
                return
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(dims))
            self.known[out] = np.array(dims[start:end], dtype=np.int64)
            return
        inputs = [v for v in node.inputs if v is not None]
        if not all(v in self.known for v in inputs):
            return
        floats = out.dtype in _FLOAT_TYPES or any(v.dtype in _FLOAT_TYPES for v in inputs)
        if floats and any(self._symbolic(v) for v in inputs):
            return
        if node.op_type in ("Concat", "Unsqueeze", "Squeeze", "Identity", "Cast"):
            self._carry_origin(node)
        model = onnx.helper.make_model(
            onnx.helper.make_graph(
                [ir.serde.serialize_node(node)],
                "eval",
                [onnx.helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in inputs],
                [onnx.helper.make_tensor_value_info(out.name, int(out.dtype), None)],
            ),
            opset_imports=self.opset_imports,
        )
        feeds = {v.name: self.feed(v) for v in inputs}
        try:
            (result,) = ReferenceEvaluator(model).run(None, feeds)
        except Exception:  # an op the reference evaluator cannot run: leave the value unknown
            return
        if result.size <= _MAX_KNOWN_ELEMENTS:
            self.known[out] = np.asarray(result).astype(np.float64 if out.dtype in _FLOAT_TYPES else np.int64)

    def _carry_origin(self, node: ir.Node) -> None:
        out = node.outputs[0]
        if node.op_type == "Concat":
            parts = [self.origin.get(v, [None] * int(self.known[v].size)) for v in node.inputs if v is not None]
            self.origin[out] = [o for part in parts for o in part]
        elif node.inputs[0] in self.origin:
            self.origin[out] = list(self.origin[node.inputs[0]])

    # -- Reshape retargeting -------------------------------------------------------------------------------
    def retarget_reshape(self, node: ir.Node) -> None:
        data, target = node.inputs[0], node.inputs[1]
        new_in, old_in = self.dims(data), self.old_dims(data)
        old_out = self.old.get(node.outputs[0])
        if target not in self.known or new_in is None or old_in is None or old_out is None:
            return
        current = self.known[target]
        origin = self.origin.get(target, [None] * current.size)
        if new_in == old_in or all(o is None for o in origin):
            return  # unchanged input, or a target computed in the graph (it follows the new shapes at run time)
        if _numel(old_in) != _numel(old_out):
            raise GraphRewriteError(f"Reshape {node.name!r}: annotated shapes {old_in} -> {old_out} disagree")
        new_out = retarget_dims(old_in, new_in, old_out)
        if self._resolve(current, new_in) == new_out:
            return  # e.g. a -1 at the token axis
        if all(d < _PROXY_PRIMES[0] for d in new_out) or (-1 in current and self._one_symbol(new_out)):
            self._retarget_constant(node, current, origin, new_in, new_out)
        else:
            self._retarget_from_shape(node, new_in, new_out)
        self.rewritten += 1

    def retarget_split(self, node: ir.Node) -> None:
        """Constant split sizes along an axis whose length changed: the last piece takes the change, the leading
        ones keep their sizes (special tokens split off ahead of the patch tokens, e.g. to rotate only the
        patches); along a symbolic axis the last size is computed from the input's shape."""
        data, sizes = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        new_in, old_in = self.dims(data), self.old_dims(data)
        if sizes is None or sizes not in self.known or new_in is None or old_in is None or new_in == old_in:
            return
        axis = node.attributes.get_int("axis", 0) % len(new_in)
        current, change = self.known[sizes], new_in[axis] - old_in[axis]
        if not change or int(current.sum()) != old_in[axis]:
            return
        if current[-1] + change < 1:
            raise GraphRewriteError(
                f"Split {node.name!r}: sizes {current.tolist()} cannot follow the axis going from {old_in[axis]} "
                f"to {new_in[axis]} (its last piece would be empty)"
            )
        desired = current.astype(np.int64)
        desired[-1] += change
        if new_in[axis] >= _PROXY_PRIMES[0]:  # a symbolic axis (a bucket's K): the last piece is computed at run time
            node.replace_input_with(1, self._split_from_shape(node, data, axis, desired[:-1]))
        else:
            node.replace_input_with(1, self._initializer(f"{node.name}_tokensieve_split", desired))
        self.rewritten += 1

    def _split_from_shape(self, node: ir.Node, data: ir.Value, axis: int, leading: np.ndarray) -> ir.Value:
        """Split sizes ``leading + [length - sum(leading)]``, the length read from ``data``'s shape at run time."""
        name = f"{node.name}_tokensieve_split"
        length = ir.Node(
            "", "Shape", [data], attributes=[ir.AttrInt64("start", axis), ir.AttrInt64("end", axis + 1)], name=name
        )
        taken = self._initializer(f"{name}_leading", np.array([leading.sum()], dtype=np.int64))
        rest = ir.Node("", "Sub", [length.outputs[0], taken], name=f"{name}_rest")
        head = self._initializer(f"{name}_head", leading)
        sizes = ir.Node(
            "", "Concat", [head, rest.outputs[0]], attributes=[ir.AttrInt64("axis", 0)], name=f"{name}_sizes"
        )
        self.graph.insert_before(node, [length, rest, sizes])
        for created in (length, rest, sizes):
            self.infer(created)
            self.evaluate(created)
        return sizes.outputs[0]

    @staticmethod
    def _one_symbol(dims: tuple[int, ...]) -> bool:
        return sum(d >= _PROXY_PRIMES[0] for d in dims) == 1

    def _retarget_constant(self, node: ir.Node, current: np.ndarray, origin: list, new_in, new_out) -> None:
        """Rewrite the constant elements of the target (a fresh initializer, or a constant delta on a partly
        computed target); a single symbolic dim stays -1."""
        desired = np.array([-1 if d >= _PROXY_PRIMES[0] else d for d in new_out], dtype=np.int64)
        if self._resolve(desired, new_in) != new_out:
            raise GraphRewriteError(
                f"Reshape {node.name!r}: target {self.proxies.shape_text(new_out)} for input "
                f"{self.proxies.shape_text(new_in)} cannot be written as constants"
            )
        changed = np.nonzero(desired != current)[0]
        if any(origin[j] is None for j in changed):
            raise GraphRewriteError(
                f"Reshape {node.name!r}: its target {current.tolist()} is computed in the graph and does not follow "
                f"the new token count ({self.proxies.shape_text(new_out)}); cannot retarget it"
            )
        name = f"{node.name}_tokensieve_shape"
        if all(o is not None for o in origin):
            new_target = self._initializer(name, desired)
        else:
            delta = self._initializer(f"{name}_delta", desired - current)
            add = ir.Node("", "Add", [node.inputs[1], delta], name=f"{name}_add")
            self.graph.insert_before(node, add)
            new_target = add.outputs[0]
            new_target.name, new_target.dtype, new_target.shape = name, ir.DataType.INT64, ir.Shape([desired.size])
        self.known[new_target] = desired
        self.origin[new_target] = [new_target if o is not None else None for o in origin]
        node.replace_input_with(1, new_target)

    def _retarget_from_shape(self, node: ir.Node, new_in, new_out) -> None:
        """Symbolic dims (a dynamic batch and a bucket's K, say): build the target at run time from the input's
        shape: ``Concat(Shape(x)[j], constants, at most one -1)``."""
        data, name = node.inputs[0], f"{node.name}_tokensieve_shape"
        shape = ir.Node("", "Shape", [data], name=f"{name}_of_input")
        nodes, pieces, free = [shape], [], 0
        for j, want in enumerate(new_out):
            if want < _PROXY_PRIMES[0]:
                pieces.append(self._initializer(f"{name}_{j}", np.array([want], dtype=np.int64)))
            elif want in new_in:
                index = self._initializer(f"{name}_{j}_index", np.array([new_in.index(want)], dtype=np.int64))
                gather = ir.Node(
                    "", "Gather", [shape.outputs[0], index], attributes=[ir.AttrInt64("axis", 0)], name=f"{name}_{j}"
                )
                nodes.append(gather)
                pieces.append(gather.outputs[0])
            else:
                free += 1
                pieces.append(self._initializer(f"{name}_{j}", np.array([-1], dtype=np.int64)))
        if free > 1:
            raise GraphRewriteError(
                f"Reshape {node.name!r}: target {self.proxies.shape_text(new_out)} has {free} symbolic dims that "
                f"are not dims of its input {self.proxies.shape_text(new_in)}"
            )
        concat = ir.Node("", "Concat", pieces, attributes=[ir.AttrInt64("axis", 0)], name=name)
        nodes.append(concat)
        self.graph.insert_before(node, nodes)
        for n in nodes:
            self.infer(n)
        self.known[concat.outputs[0]] = np.array(
            [-1 if d not in new_in and d >= _PROXY_PRIMES[0] else d for d in new_out], dtype=np.int64
        )
        node.replace_input_with(1, concat.outputs[0])

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape, value.dtype = ir.Shape(list(array.shape)), ir.DataType.INT64
        self.graph.register_initializer(value)
        self.seed_constant(value, value.const_value)
        return value

    @staticmethod
    def _resolve(target: np.ndarray, in_dims: tuple[int, ...]) -> tuple[int, ...]:
        dims = [in_dims[j] if c == 0 else int(c) for j, c in enumerate(target)]
        if -1 in dims:
            rest = _numel(d for d in dims if d != -1)
            dims[dims.index(-1)] = _numel(in_dims) // rest if rest else 0
        return tuple(dims)


def propagate_shapes(model: ir.Model, prev_shapes: Mapping[ir.Value, ir.Shape] | None = None) -> int:
    """Re-infer all shapes after an edit and retarget constant Reshape targets; returns how many were rewritten.

    ``prev_shapes`` gives, for values an edit created to replace old ones, the shape of the value they replaced
    (so that a Reshape consuming the new value knows what it used to see).
    Precondition: existing values still carry their pre-edit shapes; the graph is topologically sorted.
    Postcondition: every value whose shape can be inferred carries its new shape.
    """
    return _Propagator(model, prev_shapes or {}).run()
