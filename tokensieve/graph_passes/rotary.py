"""Rotary position tables follow the tokens: analysis and rewrite used by :mod:`token_reduction`.

Matches, in each located block, the element-wise ``Mul``/``Add``/``Sub``/``Div`` nodes on the path from the
block's input stream to its queries and keys (or a fused ``Attention`` op's Q/K) whose one operand depends on the
image and whose other operand does not (a constant, or a value computed from weights only: learned frequencies)
and has a token axis: an axis, not the last (features) one, that lines up with the data operand's token axis
and has the pre-reduction token count ``N`` or ``N - S`` (rope that skips the ``S`` special tokens). Interleaved
and split (rotate-half) layouts, 1-D and 2-D (axial, mixed) tables all reach Q/K this way: a sin/cos table
multiplied or added per token.

Inserts, for every matched node in a block after a reduction site: ``Gather`` of the table's rows along its token
axis by the original positions of the tokens that block sees (``[B, n]``, threaded from site to site by the
pass), a ``Transpose`` that brings the batch axis first and ``Unsqueeze`` to the data operand's rank, and
rewires the node to the per-sample table. The shared table itself is never modified (blocks before the first site
keep reading it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import onnx_ir as ir

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.locate import AttentionBlock, ViTLayout
from tokensieve.graph_passes.sites.common import batch_rows

_ELEMENTWISE = frozenset({"Mul", "Add", "Sub", "Div"})


@dataclass(frozen=True)
class TableUse:
    """One position table read by a block: ``node.inputs[index]`` is the table, ``axis`` its token axis,
    ``rank`` the rank of the data operand it broadcasts against, ``skips_specials`` whether its rows start at the
    first non-special token."""

    node: ir.Node
    index: int
    axis: int
    rank: int
    skips_specials: bool

    def describe(self) -> str:
        table = self.node.inputs[self.index]
        return f"node {self.node.name!r} ({self.node.op_type}) reads the position table {table.name!r} {table.shape}"


def _image_dependent(model: ir.Model) -> set[ir.Value]:
    """Every value computed (transitively) from a graph input."""
    seen: set[ir.Value] = set(model.graph.inputs)
    queue = deque(seen)
    while queue:
        for node, _ in queue.popleft().uses():
            for out in node.outputs:
                if out not in seen:
                    seen.add(out)
                    queue.append(out)
    return seen


def _qk_nodes(block: AttentionBlock) -> list[ir.Node]:
    """Nodes between the block's input stream and its queries and keys."""
    seen: set[ir.Node] = set()
    queue = deque([block.query, block.key])
    while queue:
        value = queue.popleft()
        node = value.producer()
        if value is block.stream_in or node is None or node in seen:
            continue
        seen.add(node)
        queue.extend(v for v in node.inputs if v is not None)
    return list(seen)


def _static_dims(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return tuple(value.shape)


def _dims(value: ir.Value) -> tuple[int | None, ...] | None:
    """The value's dims, symbolic ones (a dynamic batch) as None."""
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


def _table_use(node: ir.Node, dynamic: set[ir.Value], tokens: int, specials: int) -> TableUse | None:
    for index, table in enumerate(node.inputs[:2]):
        data = node.inputs[1 - index]
        if table is None or data is None or table in dynamic or data not in dynamic:
            continue
        t_dims, d_dims = _static_dims(table), _dims(data)
        if t_dims is None or d_dims is None or not 2 <= len(t_dims) <= len(d_dims):
            continue
        offset = len(d_dims) - len(t_dims)
        for axis, dim in enumerate(t_dims[:-1]):
            if axis + offset > 0 and dim in (tokens, tokens - specials) and d_dims[axis + offset] == dim > 1:
                return TableUse(node, index, axis, len(d_dims), dim == tokens - specials)
    return None


def position_tables(model: ir.Model, layout: ViTLayout) -> dict[int, list[TableUse]]:
    """The position tables each block's queries and keys read (blocks reading none are left out)."""
    dynamic = _image_dependent(model)
    found: dict[int, list[TableUse]] = {}
    for block in layout.blocks:
        uses = [
            use
            for node in _qk_nodes(block)
            if node.op_type in _ELEMENTWISE and (use := _table_use(node, dynamic, block.tokens, layout.specials))
        ]
        if uses:
            found[block.index] = uses
    return found


def compose_positions(b: NodeBuilder, positions: ir.Value | None, origin: ir.Value, specials: int) -> ir.Value:
    """Original positions ``[B, n_out]`` of the non-special tokens after a site, from the positions before it
    (None: the identity) and the site's ``origin`` (positions in the stream entering the site, ``>= specials``)."""
    if positions is None:
        return origin
    local = b.op("Sub", [origin, b.const(specials, "specials")]) if specials else origin
    return b.op("GatherElements", [positions, local], "positions", axis=1)


def follow_positions(model: ir.Model, block: AttentionBlock, uses: list[TableUse], positions: ir.Value, S: int) -> None:
    """Rewire every table ``uses`` of ``block`` to its rows at ``positions`` (``[B, n]`` original positions of the
    non-special tokens the block sees; ``S`` special tokens)."""
    b = NodeBuilder(model, f"tokensieve/rope{block.index}", {"tokensieve.rope": str(block.index)})
    gathered: dict[tuple[ir.Value, int, int, bool], ir.Value] = {}
    full: ir.Value | None = None
    for use in uses:
        table = use.node.inputs[use.index]
        key = (table, use.axis, use.rank, use.skips_specials)
        if key not in gathered:
            if use.skips_specials:
                index = b.op("Sub", [positions, b.const(S, "specials")]) if S else positions
            else:
                full = full if full is not None else with_specials(b, positions, S)
                index = full
            gathered[key] = _per_sample_rows(b, use, table, index)
        use.node.replace_input_with(use.index, gathered[key])
    insert_before_first(model, uses, b)


def insert_before_first(model: ir.Model, uses: list, b: NodeBuilder) -> None:
    """Insert ``b``'s nodes before the first (in graph order) of the nodes ``uses`` rewire."""
    order = {node: i for i, node in enumerate(model.graph)}
    first = min((u.node for u in uses), key=order.__getitem__)
    model.graph.insert_before(first, b.nodes)


def with_specials(b: NodeBuilder, positions: ir.Value, S: int) -> ir.Value:
    """``[B, S + n]``: the special tokens' positions ``0..S-1`` followed by ``positions``."""
    if not S:
        return positions
    return b.op("Concat", [batch_rows(b, list(range(S)), positions), positions], "positions", axis=1)


def _per_sample_rows(b: NodeBuilder, use: TableUse, table: ir.Value, index: ir.Value) -> ir.Value:
    """``table`` gathered along its token axis by ``index [B, n]``, batch first, padded to the data's rank."""
    dims, axis = list(table.shape), use.axis
    if len(dims) == use.rank:  # the table's first axis lines up with the batch axis
        if dims[0] != 1:
            raise GraphRewriteError(
                f"{use.describe()}: its first axis ({dims[0]}) lines up with the batch axis; a position table "
                "with a batch axis other than 1 cannot follow the kept tokens"
            )
        table = b.op("Squeeze", [table, b.const([0], "axes")])
        dims, axis = dims[1:], axis - 1
    rows = b.op("Gather", [table, index], "rope_rows", axis=axis)  # dims[:axis] + [B, n] + dims[axis+1:]
    if axis:
        rows = b.op("Transpose", [rows], perm=[axis, *range(axis), *range(axis + 1, len(dims) + 1)])
    pad = use.rank - (len(dims) + 1)
    return b.unsqueeze(rows, list(range(1, 1 + pad))) if pad else rows
