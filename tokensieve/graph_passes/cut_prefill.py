"""Graph pass: keep the decoder layers ``[start, end)`` of an MLLM **prefill** graph (one segment of a cut prefill).

A method that decides on the host between decoder layers (ATP-LLaVA: a data-dependent number of kept image tokens,
which a static ``TopK`` cannot express) runs the prefill as a chain of segment graphs with the decisions in between:

* ``start > 0``: the graph input ``inputs_embeds`` becomes ``hidden_states [1, T', D]`` and layer ``start`` reads it
  in place of the stream; ``position_ids [1, T']`` stay an input, so RoPE, the causal mask and ``repeat_kv`` shapes
  (computed once from the inputs for every layer) follow the kept tokens and their original positions; the
  ``present_*`` of earlier layers go;
* ``end < layers``: the residual stream entering layer ``end`` leaves as ``hidden_states_out [1, T', D]``; the
  logits and the ``present_*`` of layers ``>= end`` go (with the final norm, the LM head and the later layers);
* every other output stays (e.g. :mod:`tokensieve.graph_passes.atp_scores`' scores, added before the cut).

Matches: the layers of :func:`tokensieve.graph_passes.locate_decoder.locate_decoder` (cache form ``none``).
Preconditions (``requires``): a prefill graph with inputs ``inputs_embeds`` / ``position_ids``; ``0 <= start < end
<= layers`` and not the whole graph; ``inputs_embeds`` is read for its values only by layer 0 (elsewhere through
``Shape``). Postconditions (``ensures``): exactly the layers ``[start, end)`` are left (a segment that would still
need an earlier layer is refused); the graph has logits iff ``end == layers``.
"""

from __future__ import annotations

import itertools
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes import FACES, run_passes
from tokensieve.graph_passes.builder import redirect_uses
from tokensieve.graph_passes.locate_decoder import DecoderLayout, locate_decoder
from tokensieve.graph_passes.split_cache_slot import split_decode
from tokensieve.methods.base import PrefillCuts
from tokensieve.methods.faces import register

STREAM_IN, STREAM_OUT = "hidden_states", "hidden_states_out"


class CutPrefillPass(ir.passes.InPlacePass):
    """Keep decoder layers ``[start, end)`` of a prefill graph (``end=None``: to the last layer)."""

    def __init__(self, start: int, end: int | None = None):
        super().__init__()
        self.start, self.end = start, end
        self.layout: DecoderLayout | None = None

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_decoder(model)
        if self.layout.cache != "none":
            raise GraphRewriteError(f"cut_prefill: expected a prefill graph, got a {self.layout.cache}-cache graph")
        count = len(self.layout.layers)
        self.end = count if self.end is None else self.end
        if not 0 <= self.start < self.end <= count or (self.start, self.end) == (0, count):
            raise GraphRewriteError(
                f"cut_prefill: layers [{self.start}, {self.end}) are not a proper segment of {count} decoder layers"
            )
        if "inputs_embeds" not in {v.name for v in model.graph.inputs}:
            raise GraphRewriteError("cut_prefill: the graph has no input 'inputs_embeds'")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, layers = model.graph, self.layout.layers
        gone = {v for layer in (*layers[: self.start], *layers[self.end :]) for v in layer.cache_outputs}
        kept = [v for v in graph.outputs if v not in gone]
        if self.end < len(layers):
            stream = layers[self.end].stream_in
            stream.name = STREAM_OUT
            kept = [stream, *(v for v in kept if v.name != "logits")]
        if self.start > 0:
            embeds = next(v for v in graph.inputs if v.name == "inputs_embeds")
            stream = layers[self.start].stream_in
            redirect_uses(stream, embeds, list(stream.uses()))
            embeds.name = STREAM_IN
        graph.outputs.clear()
        graph.outputs.extend(kept)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        if ("logits" in {v.name for v in graph.outputs}) != (self.end == len(self.layout.layers)):
            raise GraphRewriteError("cut_prefill: only the last segment has the logits")
        for layer in self.layout.layers:
            wanted = self.start <= layer.index < self.end
            if (layer.softmax.graph is graph) != wanted:
                state = "remains" if not wanted else "is gone"
                raise GraphRewriteError(f"cut_prefill: decoder layer {layer.index} {state} in the segment graph")


@register("export", PrefillCuts)
def rewrite(graphs: dict[str, Any], method: PrefillCuts) -> dict[str, Any]:
    """``prefill`` -> ``prefill_0 .. prefill_n``: the segments between the cuts, each but the last with the scores of
    its last layer (the layer before the next cut; the method's ``"prefill_scores"`` pass), and the decode graphs
    split into one cache length per group of layers after a cut."""
    score = FACES.lookup("prefill_scores", method)
    full = graphs["prefill"]
    bounds = [0, *method.cuts, None]
    segments = {}
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        segment = full if end is None else full.clone()  # clones share the weights' tensors; the last is the original
        run_passes(segment, [*([score(end - 1)] if end else []), CutPrefillPass(start, end)])
        segments[f"prefill_{index}"] = segment
    ordered: dict[str, Any] = {}
    for key, model in graphs.items():
        ordered.update(segments if key == "prefill" else {key: model})
    split_decode(ordered, method)
    return ordered
