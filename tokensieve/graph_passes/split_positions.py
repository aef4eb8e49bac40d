"""Graph pass: the decoder layers from ``first`` on rotate the new token at their own position, in a **decode** graph.

MustDrop's official decoding gives every layer the position of its own cache length: the layers whose cache was
shrunk after prefill (from the first filter layer on) rotate the new token at ``position - dropped``, the earlier
layers at the absolute position. A decode graph computes RoPE's ``cos``/``sin`` once from ``position_ids`` and
shares them with every layer; this pass gives the later layers their own.

Matches: the decoder layers of a decode graph (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`), fixed
or growing cache.

SparseVLM (contiguous positions) cuts several times, so each cut's later layers rotate at their own cache length: the
pass runs once per cut, in order, ``group`` 0, 1, ..., each later group splitting off the layers from its ``first`` on.

Inserts: a graph input :func:`positions_input` ``(group)`` ``[1, 1]`` (int64: ``pruned_position_ids``,
``pruned_position_ids_1``, ...); everything the layers from ``first`` on read that is computed from ``position_ids``
(group 0) or the previous group's input (RoPE's ``cos``/``sin``) is re-derived from it
(:func:`tokensieve.graph_passes.rederive.rederive`); earlier layers are untouched.

Preconditions (``requires``): a decode graph with a ``position_ids`` input; ``1 <= first < layers``; for
``group > 0`` the previous group's pass has run.
Postconditions (``ensures``): no node downstream of layer ``first``'s input reads a value computed from
``position_ids`` through the shared computation; the other inputs and outputs are unchanged.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes.locate_decoder import DecoderLayout, locate_decoder
from tokensieve.graph_passes.rederive import downstream, rederive

PRUNED_POSITIONS = "pruned_position_ids"


def positions_input(group: int) -> str:
    """The name of group ``group``'s position input (``-1``: the unsplit ``position_ids``)."""
    return "position_ids" if group < 0 else PRUNED_POSITIONS + (f"_{group}" if group else "")


class SplitPositionsPass(ir.passes.InPlacePass):
    """Let layers ``>= first`` of a decode graph take their RoPE position from ``pruned_position_ids`` (or, for
    ``group > 0``, ``pruned_position_ids_<group>``)."""

    def __init__(self, first: int, group: int = 0):
        super().__init__()
        self.first, self.group = first, group
        self.layout: DecoderLayout | None = None

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_decoder(model)
        if self.layout.cache == "none":
            raise GraphRewriteError(
                "split positions: expected a decode graph (with a cache input), got a prefill graph"
            )
        if not 1 <= self.first < len(self.layout.layers):
            raise GraphRewriteError(f"split positions: layer {self.first} is not in 1..{len(self.layout.layers) - 1}")
        if positions_input(self.group - 1) not in {v.name for v in model.graph.inputs}:
            raise GraphRewriteError(f"split positions: the decode graph has no {positions_input(self.group - 1)} input")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        positions = next(v for v in graph.inputs if v.name == positions_input(self.group - 1))
        name, shape = positions_input(self.group), ir.Shape(positions.shape)
        own = ir.Value(name=name, shape=shape, type=ir.TensorType(positions.dtype))
        graph.inputs.append(own)
        cut = self.layout.layers[self.first].stream_in
        created = rederive(graph, downstream(cut), {positions: own}, [cut], f"tokensieve/split_positions{self.group}")
        if not created:
            raise GraphRewriteError(f"split positions: layers from {self.first} on read nothing from {positions.name}")
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        own = next(v for v in model.graph.inputs if v.name == positions_input(self.group))
        if not own.uses():
            raise GraphRewriteError(f"split positions: nothing reads {own.name} after the pass")
