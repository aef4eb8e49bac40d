"""Graph pass: the decoder layers from ``first`` on rotate the new token at their own position, in a **decode** graph.

MustDrop's official decoding gives every layer the position of its own cache length: the layers whose cache was
shrunk after prefill (from the first filter layer on) rotate the new token at ``position - dropped``, the earlier
layers at the absolute position. A decode graph computes RoPE's ``cos``/``sin`` once from ``position_ids`` and
shares them with every layer; this pass gives the later layers their own.

Matches: the decoder layers of a decode graph (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`), fixed
or growing cache.

Inserts: a graph input ``pruned_position_ids [1, 1]`` (int64); everything the layers from ``first`` on read that is
computed from ``position_ids`` (RoPE's ``cos``/``sin``) is re-derived from it
(:func:`tokensieve.graph_passes.rederive.rederive`); earlier layers are untouched.

Preconditions (``requires``): a decode graph with a ``position_ids`` input; ``1 <= first < layers``.
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


class SplitPositionsPass(ir.passes.InPlacePass):
    """Let layers ``>= first`` of a decode graph take their RoPE position from ``pruned_position_ids``."""

    def __init__(self, first: int):
        super().__init__()
        self.first = first
        self.layout: DecoderLayout | None = None

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_decoder(model)
        if self.layout.cache == "none":
            raise GraphRewriteError(
                "split positions: expected a decode graph (with a cache input), got a prefill graph"
            )
        if not 1 <= self.first < len(self.layout.layers):
            raise GraphRewriteError(f"split positions: layer {self.first} is not in 1..{len(self.layout.layers) - 1}")
        if "position_ids" not in {v.name for v in model.graph.inputs}:
            raise GraphRewriteError("split positions: the decode graph has no position_ids input")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        positions = next(v for v in graph.inputs if v.name == "position_ids")
        own = ir.Value(name=PRUNED_POSITIONS, shape=ir.Shape(positions.shape), type=ir.TensorType(positions.dtype))
        graph.inputs.append(own)
        cut = self.layout.layers[self.first].stream_in
        created = rederive(graph, downstream(cut), {positions: own}, [cut], "tokensieve/split_positions")
        if not created:
            raise GraphRewriteError(f"split positions: layers from {self.first} on read nothing from position_ids")
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        own = next(v for v in model.graph.inputs if v.name == PRUNED_POSITIONS)
        if not own.uses():
            raise GraphRewriteError("split positions: nothing reads pruned_position_ids after the pass")
