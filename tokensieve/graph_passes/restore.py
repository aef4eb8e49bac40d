"""Restore the full token grid for dense consumers: analysis and rewrite used by :mod:`token_reduction`.

Matches: the stream leaving each located block (the next block's input; after the last block, the ``Add`` that
closes its MLP branch) at or after the first reduction site, where nodes outside the block chain read it: an
intermediate tap (DPT's reassemble stages, timm's ``forward_intermediates``) or, after the last block, the final
norm, head or graph output. The block chain is every node between block 0's input and the last block's output.

Inserts, threaded from site to site (:meth:`GridRestore.follow`): the **source map** ``[B, N0]`` int64, for every
token entering block 0, the position of the current token that holds it (a kept token itself, a merged one its
destination), or ``-1 - j`` when it was dropped as row ``j`` of the **bank**: the dropped tokens' rows of the stream
at their site (after that block's attention, before its MLP), concatenated site after site, a static ``[B, P, C]``.
Each site gives its ``assign`` (where each of its input tokens goes); the maps compose with ``GatherElements`` and
``Where``, no scatter. Before every outside reader of a block output (:meth:`GridRestore.apply`):
``GatherND(Concat[stream, bank], index)`` with ``index = source`` for held tokens and ``N - 1 - source`` for dropped
ones: ``[B, N0, C]``, every position with its holder's features or its own from the site that dropped it, so the
readers see the shapes of the unreduced model. The source map after each site is exposed as
``tokensieve/site<k>/source`` for parity.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import onnx_ir as ir

from tokensieve.errors import GraphRewriteError, LocateError
from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.locate import AttentionBlock, ViTLayout
from tokensieve.graph_passes.propagate import containing_axis, proxied_dims
from tokensieve.graph_passes.rederive import downstream
from tokensieve.graph_passes.sites.common import SiteOutput, gather_tokens
from tokensieve.methods.base import Method, SiteCount

RESTORE_KEY = "tokensieve.restore"  # model metadata: the blocks whose outputs are restored (JSON list)


@dataclass
class _State:
    source: ir.Value  # [B, N0] after the site
    bank: list[ir.Value]  # [B, P_s, C] per site that dropped tokens
    rows: int  # P: rows in the bank
    tokens: int  # tokens in the stream after the site


@dataclass
class GridRestore:
    """The taps of a located ViT and the source map / bank threaded through its sites."""

    model: ir.Model
    layout: ViTLayout
    taps: dict[int, list[tuple[ir.Node, int]]] = field(default_factory=dict)  # block -> outside uses of its output
    outputs: dict[int, ir.Value] = field(default_factory=dict)  # block -> its output value
    states: dict[int, _State] = field(default_factory=dict)  # site block -> state after it

    @classmethod
    def locate(cls, model: ir.Model, layout: ViTLayout, first: int) -> GridRestore:
        """Find the block outputs at or after block ``first`` (the first site's) read outside the chain (before any
        rewrite)."""
        grid = cls(model, layout)
        outputs = [b.stream_in for b in layout.blocks[1:]] + [block_output(layout.blocks[-1])]
        chain = _between(layout.blocks[0].stream_in, outputs[-1])
        for index, value in enumerate(outputs):
            uses = [(node, i) for node, i in value.uses() if node not in chain]
            if index >= first and (uses or value in model.graph.outputs):
                grid.taps[index], grid.outputs[index] = uses, value
        return grid

    def needs_grid(self) -> bool:
        """Whether an outside reader folds the token axis into a spatial grid: following the token axis (axis 1 of a
        block output) through the readers, a ``Reshape`` splits it across several output axes (the model's output
        is a map). Readers the walk does not know end it (no grid found there)."""
        queue = deque((node, self.outputs[index], 1) for index, uses in self.taps.items() for node, _ in uses)
        seen: set[tuple[ir.Node, int]] = set()
        while queue:
            node, value, axis = queue.popleft()
            if (node, axis) in seen:
                continue
            seen.add((node, axis))
            if node.op_type == "Reshape" and node.inputs[0] is value and _splits(node, axis):
                return True
            out_axis = _token_axis(node, value, axis)
            if out_axis is not None:
                queue.extend((user, node.outputs[0], out_axis) for user, _ in node.outputs[0].uses())
        return False

    def follow(self, b: NodeBuilder, method: Method, count: SiteCount, out: SiteOutput) -> None:
        """Compose the source map with the site's ``assign``; add its dropped rows to the bank."""
        if out.assign is None:
            raise GraphRewriteError(
                f"{method.name} at block {count.layer} says nothing about where its input tokens go, so the token "
                "grid cannot be restored after it; export with --restore-grid off, or with a method that gives a "
                "source map (docs/methods.md#dense-outputs)"
            )
        previous = self.states[max(self.states)] if self.states else None
        assign = out.assign
        if previous is not None and previous.rows and out.pruned is not None:
            dropped = b.op("Less", [assign, b.const(0, "zero")])
            assign = b.op("Where", [dropped, b.op("Sub", [assign, b.const(previous.rows, "rows")]), assign])
        source = assign
        if previous is not None:
            held = b.op("GreaterOrEqual", [previous.source, b.const(0, "zero")])
            index = b.op("Where", [held, previous.source, b.const(0, "zero")])
            source = b.op("Where", [held, b.op("GatherElements", [assign, index], axis=1), previous.source])
        source = b.expose(b.op("Identity", [source]), "source")
        bank, rows = (list(previous.bank), previous.rows) if previous is not None else ([], 0)
        if out.pruned is not None:
            bank.append(out.pruned)
            rows += out.dropped
        self.states[count.layer] = _State(source, bank, rows, count.tokens_out)

    def apply(self) -> list[int]:
        """Restore the grid before every outside reader of a block output; returns the blocks restored."""
        for index, uses in self.taps.items():
            state = self.states[max(layer for layer in self.states if layer <= index)]
            value = self.outputs[index]
            b = NodeBuilder(self.model, f"tokensieve/restore{index}", {RESTORE_KEY: str(index)})
            index_map = state.source
            pool = value
            if state.bank:
                pool = b.op("Concat", [value, *state.bank], "pool", axis=1)
                held = b.op("GreaterOrEqual", [state.source, b.const(0, "zero")])
                banked = b.op("Sub", [b.const(state.tokens - 1, "last"), state.source])
                index_map = b.op("Where", [held, state.source, banked])
            restored = gather_tokens(b, pool, index_map)
            self.model.graph.insert_after(value.producer(), b.nodes)
            for node, i in uses:
                node.replace_input_with(i, restored)
            _take_output(self.model.graph, value, restored)
        return sorted(self.taps)


def block_output(block: AttentionBlock) -> ir.Value:
    """The stream leaving ``block``: the ``Add`` of its post-attention stream and a branch computed from it (the
    MLP residual)."""
    post = block.post_attention
    branch = downstream(post, limit=400)
    for node, _ in post.uses():
        if node.op_type == "Add" and len(node.inputs) == 2:
            other = node.inputs[1] if node.inputs[0] is post else node.inputs[0]
            if other.producer() in branch:
                return node.outputs[0]
    raise LocateError(f"block {block.name}: no MLP residual Add after its attention; cannot find the block output")


def _between(start: ir.Value, end: ir.Value) -> set[ir.Node]:
    """Nodes that are ancestors of ``end`` and descendants of ``start``."""
    after = downstream(start)
    seen: set[ir.Node] = set()
    queue = deque([end.producer()])
    while queue:
        node = queue.popleft()
        if node is None or node in seen or node not in after:
            continue
        seen.add(node)
        queue.extend(v.producer() for v in node.inputs if v is not None)
    return seen


_SAME_AXES = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Gelu", "Relu", "Sigmoid", "Tanh", "Neg", "Exp", "Log", "Cast",
     "Identity", "Where", "LayerNormalization", "Softmax", "Slice", "Concat", "Dropout", "Clip", "ReduceMean"}
)  # fmt: skip


def _token_axis(node: ir.Node, value: ir.Value, axis: int) -> int | None:
    """The axis of ``node``'s first output that carries the token axis ``axis`` of its input ``value`` (None: the
    axis is reduced, contracted, or the op is one the walk does not follow)."""
    shape_in, shape_out = proxied_dims(value.shape, node.outputs[0].shape)
    if shape_in is None or shape_out is None:
        return None
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", list(reversed(range(len(shape_in)))))
        return list(perm).index(axis)
    if node.op_type == "Reshape" and node.inputs[0] is value:
        return containing_axis(shape_in, axis, shape_out)
    if node.op_type == "MatMul" and len(shape_in) == len(shape_out):
        first = node.inputs[0] is value
        return axis if (first and axis < len(shape_in) - 1) or (not first and axis == len(shape_in) - 1) else None
    if node.op_type in _SAME_AXES and len(shape_in) == len(shape_out) and shape_out[axis] > 1:
        return axis  # (a reduction over the token axis leaves it 1 long: the walk ends there)
    return None


def _splits(node: ir.Node, axis: int) -> bool:
    shape_in, shape_out = proxied_dims(node.inputs[0].shape, node.outputs[0].shape)
    if shape_in is None or shape_out is None or shape_in[axis] < 2:
        return False
    return containing_axis(shape_in, axis, shape_out) is None


def _take_output(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """A block output that is itself a graph output: the restored value takes its place and its name."""
    for i, out in enumerate(graph.outputs):
        if out is old:
            name = old.name
            old.name = f"{name}_reduced"
            new.name = name
            graph.outputs[i] = new
