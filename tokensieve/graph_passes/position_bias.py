"""Relative position biases follow the tokens: analysis and rewrite used by :mod:`token_reduction`.

Matches the position-bias ``Add`` nodes :func:`tokensieve.graph_passes.locate.locate_vit` records in each block's
logit chain (``AttentionBlock.position_bias``): a ``[..., N, N]`` tensor that does not depend on the image, added to
the ``[B, H, N, N]`` attention logits before the ``Softmax`` (BEiT's relative position bias, gathered by the model
from its ``relative_position_index`` table; the exporter usually folds it to a constant, sometimes expanded to the
batch: then the copies are equal and the first one is used).

Inserts, for every such node in a block after a reduction site: the bias flattened to ``[L, N·N]`` (its leading
axes, heads, in ``L``), one ``Gather`` at the pairs ``p_i·N + p_j`` of the original positions ``p [B, n]`` of the
tokens that block sees (special tokens at ``0..S-1``; the same positions :mod:`rotary` threads from site to site:
kept tokens keep theirs, a merged group takes its destination's), and a ``Transpose`` to ``[B, L, n, n]``; the
node is rewired to this per-sample bias. The shared bias itself is never modified (blocks before the first site
keep reading it).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.locate import AttentionBlock, ViTLayout
from tokensieve.graph_passes.rotary import (
    TableUse,
    follow_positions,
    insert_before_first,
    position_tables,
    with_specials,
)


@dataclass(frozen=True)
class BiasUse:
    """One position bias added to a block's logits: ``node.inputs[index]`` is the ``[..., N, N]`` bias."""

    node: ir.Node
    index: int

    def describe(self) -> str:
        bias = self.node.inputs[self.index]
        return f"node {self.node.name!r} ({self.node.op_type}) adds the position bias {bias.name!r} {bias.shape}"


def position_biases(layout: ViTLayout) -> dict[int, list[BiasUse]]:
    """The position biases each block adds to its logits (blocks adding none are left out)."""
    return {
        block.index: [BiasUse(node, index) for node, index in block.position_bias]
        for block in layout.blocks
        if block.position_bias
    }


@dataclass(frozen=True)
class PositionReaders:
    """The rotary tables (:mod:`rotary`) and position biases each block reads: what must follow the tokens."""

    tables: dict[int, list[TableUse]]
    biases: dict[int, list[BiasUse]]

    @classmethod
    def find(cls, model: ir.Model, layout: ViTLayout) -> PositionReaders:
        return cls(position_tables(model, layout), position_biases(layout))

    def after(self, layer: int) -> list[TableUse | BiasUse]:
        """The reads of the first block after ``layer`` that reads any ([] if none does)."""
        later = sorted(i for i in {*self.tables, *self.biases} if i > layer)
        return [*self.tables.get(later[0], []), *self.biases.get(later[0], [])] if later else []

    def follow(self, model: ir.Model, block: AttentionBlock, positions: ir.Value | None, S: int) -> None:
        """Rewire the block's tables and biases to ``positions`` (``[B, n]``; None: the identity, nothing to do)."""
        if positions is None:
            return
        if block.index in self.tables:
            follow_positions(model, block, self.tables[block.index], positions, S)
        if block.index in self.biases:
            follow_bias(model, block, self.biases[block.index], positions, S)


def follow_bias(model: ir.Model, block: AttentionBlock, uses: list[BiasUse], positions: ir.Value, S: int) -> None:
    """Rewire every bias ``uses`` of ``block`` to its rows and columns at ``positions`` (``[B, n]`` original
    positions of the non-special tokens the block sees; ``S`` special tokens)."""
    b = NodeBuilder(model, f"tokensieve/relpos{block.index}", {"tokensieve.relpos": str(block.index)})
    full = with_specials(b, positions, S)  # [B, n']
    pairs: dict[int, ir.Value] = {}
    gathered: dict[ir.Value, ir.Value] = {}
    for use in uses:
        bias = use.node.inputs[use.index]
        if bias not in gathered:
            tokens = _tokens(use)
            if tokens not in pairs:
                rows = b.op("Mul", [b.unsqueeze(full, [2]), b.const(tokens, "tokens")])
                pairs[tokens] = b.op("Add", [rows, b.unsqueeze(full, [1])], "pairs")  # [B, n', n']
            table = bias
            if _batch_copies(use):  # the exporter expanded the bias to the batch and folded it: one copy serves
                table = b.op("Gather", [bias, b.const(0, "first")], "bias", axis=0)
            flat = b.op("Reshape", [table, b.const([-1, tokens * tokens], "flat")])  # [L, N·N]
            picked = b.op("Gather", [flat, pairs[tokens]], "bias_rows", axis=1)  # [L, B, n', n']
            gathered[bias] = b.op("Transpose", [picked], "bias", perm=[1, 0, 2, 3])
        use.node.replace_input_with(use.index, gathered[bias])
    insert_before_first(model, uses, b)


def _batch_copies(use: BiasUse) -> bool:
    """Whether the bias is a constant ``[B, H, N, N]`` made of ``B`` equal copies along its batch axis."""
    bias = use.node.inputs[use.index]
    if len(bias.shape) != 4 or bias.shape[0] == 1 or bias.const_value is None:
        return False
    array = bias.const_value.numpy()
    return bool((array == array[:1]).all())


def _tokens(use: BiasUse) -> int:
    dims = list(use.node.inputs[use.index].shape)
    if len(dims) == 4 and dims[0] != 1 and not _batch_copies(use):
        raise GraphRewriteError(
            f"{use.describe()}: its first axis ({dims[0]}) lines up with the batch axis; a position bias with a "
            "batch axis other than 1 cannot follow the kept tokens"
        )
    return int(dims[-1])
