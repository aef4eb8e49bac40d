"""Re-derive the side inputs of a graph region from substituted graph inputs (a helper of the decoder passes).

A decoder graph computes some tensors once and shares them with every layer: RoPE's ``cos``/``sin`` from
``position_ids``, the causal mask and ``repeat_kv``'s target shape from ``Shape(inputs_embeds)``, the cache write
index and visibility mask from ``cache_position``. When a pass changes what the layers after a cut see (fewer tokens
after FastV, another cache slot), those shared tensors must follow, for the layers after the cut only.

:func:`rederive` clones, for the nodes of a region, the computation of every value they read from outside the region
that depends on a substituted graph input, with the substitutes in place of the inputs, and points the region at
the clones. Nodes outside the region keep the originals. Values that need no substitute are shared as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping

import onnx_ir as ir

from tokensieve.errors import GraphRewriteError


def downstream(value: ir.Value, limit: int | None = None) -> set[ir.Node]:
    """Every node that (transitively) reads ``value``, nearest first: at most ``limit`` of them when given."""
    seen: set[ir.Node] = set()
    queue = deque(node for node, _ in value.uses())
    while queue and (limit is None or len(seen) < limit):
        node = queue.popleft()
        if node in seen:
            continue
        seen.add(node)
        queue.extend(user for out in node.outputs for user, _ in out.uses())
    return seen


def rederive(
    graph: ir.Graph,
    region: set[ir.Node],
    substitutes: Mapping[ir.Value, ir.Value],
    through: Collection[ir.Value],
    prefix: str,
    shape_only: frozenset[ir.Value] = frozenset(),
) -> list[ir.Node]:
    """Clone what ``region`` reads from outside that depends on a key of ``substitutes`` (graph inputs), computing
    it from the substitutes instead; values in ``through`` (the region's main inputs, e.g. the residual stream after
    the cut) are read as they are. Inputs in ``shape_only`` may be read only by ``Shape`` nodes in those
    computations (their substitute has another length, not the same values). Returns the new nodes (appended to
    ``graph``; sort topologically afterwards)."""
    tainted = set(substitutes)
    for node in graph:
        if any(v in tainted for v in node.inputs if v is not None):
            tainted.update(node.outputs)
    clones: dict[ir.Value, ir.Value] = dict(substitutes)
    created: list[ir.Node] = []

    def clone(value: ir.Value) -> ir.Value:
        # iterative post-order over the producers of ``value`` that are tainted and not cloned yet
        stack = [value]
        while stack:
            top = stack[-1]
            if top in clones:
                stack.pop()
                continue
            node = top.producer()
            pending = [v for v in node.inputs if v is not None and v in tainted and v not in clones]
            if pending:
                stack.extend(pending)
                continue
            for v in node.inputs:
                _check_shape_read(node, v, shape_only)
            copy = ir.Node(
                node.domain,
                node.op_type,
                [clones.get(v, v) if v is not None else None for v in node.inputs],
                attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                overload=node.overload,
                num_outputs=len(node.outputs),
                version=node.version,
                name=f"{prefix}/{node.name}",
                metadata_props=dict(node.metadata_props),
            )
            for old, new in zip(node.outputs, copy.outputs, strict=True):
                new.name, new.dtype, new.shape = f"{prefix}/{old.name}", old.dtype, old.shape
                clones[old] = new
            created.append(copy)
            stack.pop()
        return clones[value]

    for node in region:
        for index, value in enumerate(node.inputs):
            if value is None or value in through or value not in tainted or value.producer() in region:
                continue
            _check_shape_read(node, value, shape_only)
            node.replace_input_with(index, clone(value))
    graph.extend(created)
    return created


def _check_shape_read(node: ir.Node, value: ir.Value | None, shape_only: frozenset[ir.Value]) -> None:
    if value in shape_only and node.op_type != "Shape":
        raise GraphRewriteError(
            f"{node.op_type} node {node.name!r} reads the values of {value.name!r}, not only its shape; the layers "
            "after the cut cannot be re-derived from the reduced sequence"
        )
