"""Graph pass: give the decoder layers from ``first`` on their own cache length, in a **decode** graph.

After a prefill that dropped tokens before layer ``first`` (FastV, ATP-LLaVA), those layers cache fewer positions
than the earlier ones, for the rest of the generation, while new tokens keep their absolute position ids. A method
that cuts before several layers (ATP-LLaVA with ``layers=[k1, k2, ...]``) runs the pass once per cut, in order,
``group`` 0, 1, ...: each later group splits off the layers from its ``first`` on.

Matches: the decoder layers of a decode graph (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`).

Inserts:

* fixed-capacity cache (input ``cache_position [1]``, one shared ``ScatterND`` index and visibility mask): a graph
  input :func:`slot_input` ``(group)`` ``[1]`` (``pruned_cache_position``, ``pruned_cache_position_1``, ...: the slot
  the layers from ``first`` on write, ``cache_position - dropped``); the write index and mask those layers read are
  re-derived from it (:func:`tokensieve.graph_passes.rederive.rederive`) in place of the slot input they read
  before (``cache_position`` for group 0, the previous group's otherwise); earlier layers are untouched;
* growing cache: nothing to compute (each layer's past length is its own input's); the past/present sequence
  dimension of layers ``>= first`` is renamed ``past_kept`` (``past_kept_1``, ...) so the lengths are distinct
  symbols.

Preconditions (``requires``): a decode graph; ``1 <= first < layers``; for ``group > 0`` the previous group's pass
has run. Postconditions (``ensures``): fixed cache: the cache writes of the layers from ``first`` on derive their
index from this group's slot input and not from the one before; the other inputs and outputs are unchanged.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.locate import _ancestors
from tokensieve.graph_passes.locate_decoder import DecoderLayout, locate_decoder
from tokensieve.graph_passes.rederive import downstream, rederive
from tokensieve.graph_passes.split_positions import SplitPositionsPass
from tokensieve.methods.decoder import GROUP_OUTPUT, DecoderMethod

PRUNED_SLOT = "pruned_cache_position"
PAST_KEPT = "past_kept"


def group_output(group: int) -> str:
    """The name of a prefill graph's output holding the prompt positions cache group ``group``'s layers keep (a
    method that decides every group inside one prefill graph, p-MoD; the runtime feeds ``position - dropped`` to
    the group's slot input, :func:`slot_input`)."""
    return f"{GROUP_OUTPUT}{group}"


def slot_input(group: int) -> str:
    """The name of group ``group``'s write-slot input (``-1``: the unsplit ``cache_position``)."""
    return "cache_position" if group < 0 else PRUNED_SLOT + (f"_{group}" if group else "")


def _past_axis(group: int) -> str:
    return PAST_KEPT + (f"_{group}" if group else "")


class SplitCacheSlotPass(ir.passes.InPlacePass):
    """Let layers ``>= first`` of a decode graph use their own cache slot / length (see module docstring)."""

    def __init__(self, first: int, group: int = 0):
        super().__init__()
        self.first, self.group = first, group
        self.layout: DecoderLayout | None = None

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_decoder(model)
        if self.layout.cache == "none":
            raise GraphRewriteError(
                "split cache slot: expected a decode graph (with a cache input), got a prefill graph"
            )
        if not 1 <= self.first < len(self.layout.layers):
            raise GraphRewriteError(f"split cache slot: layer {self.first} is not in 1..{len(self.layout.layers) - 1}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, later = model.graph, self.layout.layers[self.first :]
        if self.layout.cache == "growing":
            past = str(later[0].cache_inputs[0].shape[2])
            for layer in later:
                for value in (*layer.cache_inputs, *layer.cache_outputs):
                    dims = list(value.shape)
                    dims[2] = str(dims[2]).replace(past, _past_axis(self.group))
                    value.shape = ir.Shape(dims)
            return ir.passes.PassResult(model, modified=True)
        slot = next((v for v in graph.inputs if v.name == slot_input(self.group - 1)), None)
        if slot is None:
            raise GraphRewriteError(
                f"split cache slot: the fixed-cache decode graph has no {slot_input(self.group - 1)} input"
            )
        name = slot_input(self.group)
        pruned = ir.Value(name=name, shape=ir.Shape(slot.shape), type=ir.TensorType(slot.dtype))
        graph.inputs.append(pruned)
        cut = later[0].stream_in
        rederive(graph, downstream(cut), {slot: pruned}, [cut], f"tokensieve/split_cache_slot{self.group}")
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if self.layout.cache != "fixed":
            return
        inputs = {v.name: v for v in model.graph.inputs}
        before, own = inputs[slot_input(self.group - 1)], inputs[slot_input(self.group)]
        for layer in locate_decoder(model).layers[self.first :]:
            for write in layer.cache_writes:
                sources = _ancestors(write.inputs[1])
                if before in sources or own not in sources:
                    raise GraphRewriteError(f"split cache slot: {write.name} does not write at {own.name}")


def split_decode(graphs: dict[str, ir.Model], method: DecoderMethod) -> None:
    """The decode graphs' layers after each of ``method.cache_cuts`` on their own cache length (one slot input per
    group); with ``contiguous_positions``, on their own positions too (one position input per group)."""
    cuts = method.cache_cuts if method.contiguous_positions else ()
    contiguous = [SplitPositionsPass(first, g) for g, first in enumerate(cuts)]
    for key in ("decode", "decode_growing"):
        if key in graphs:
            passes = [SplitCacheSlotPass(first, g) for g, first in enumerate(method.cache_cuts)]
            run_passes(graphs[key], passes + contiguous)
