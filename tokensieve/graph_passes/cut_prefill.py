"""Graph pass: cut an MLLM **prefill** graph before decoder layer ``layer`` into a head or a tail graph.

A method that decides on the host between two decoder layers (ATP-LLaVA: a data-dependent number of kept image
tokens, which a static ``TopK`` cannot express) runs the prefill as two graphs with the decision in between:

* ``part="head"``: layers ``< layer``. Outputs: ``hidden_states [1, T, D]`` (the residual stream entering
  ``layer``), those layers' ``present_*``, and every other output that is not the logits or a later layer's cache
  (e.g. :mod:`tokensieve.graph_passes.atp_scores`' scores). The final norm, the LM head and the later layers go;
* ``part="tail"``: layers ``>= layer``. The graph input ``inputs_embeds`` becomes ``hidden_states [1, T', D]`` and
  layer ``layer`` reads it in place of the stream; ``position_ids [1, T']`` stay an input, so RoPE, the causal mask
  and ``repeat_kv`` shapes (computed once from the inputs for every layer) follow the kept tokens and their
  original positions. Outputs: ``logits`` and the ``present_*`` of layers ``>= layer``.

Matches: the layers of :func:`tokensieve.graph_passes.locate_decoder.locate_decoder` (cache form ``none``).
Preconditions (``requires``): a prefill graph with inputs ``inputs_embeds`` / ``position_ids``; ``1 <= layer <
layers``; ``inputs_embeds`` is read for its values only by layer 0 (elsewhere through ``Shape``; checked: a tail
whose earlier layers would still be needed is refused). Postconditions (``ensures``): every kept layer is there and
no removed layer is left; the head has no ``logits``, the tail has them.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes.builder import redirect_uses
from tokensieve.graph_passes.locate_decoder import DecoderLayout, locate_decoder

PARTS = ("head", "tail")
STREAM = "hidden_states"


class CutPrefillPass(ir.passes.InPlacePass):
    """Keep the decoder layers before (``head``) or from (``tail``) ``layer`` of a prefill graph."""

    def __init__(self, layer: int, part: str):
        super().__init__()
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}")
        self.layer, self.part = layer, part
        self.layout: DecoderLayout | None = None

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_decoder(model)
        if self.layout.cache != "none":
            raise GraphRewriteError(f"cut_prefill: expected a prefill graph, got a {self.layout.cache}-cache graph")
        if not 1 <= self.layer < len(self.layout.layers):
            raise GraphRewriteError(
                f"cut_prefill: layer {self.layer} is out of range for {len(self.layout.layers)} decoder layers"
            )
        if "inputs_embeds" not in {v.name for v in model.graph.inputs}:
            raise GraphRewriteError("cut_prefill: the graph has no input 'inputs_embeds'")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, layers = model.graph, self.layout.layers
        stream = layers[self.layer].stream_in
        before = {v for layer in layers[: self.layer] for v in layer.cache_outputs}
        if self.part == "head":
            dropped = {v for layer in layers[self.layer :] for v in layer.cache_outputs}
            kept = [v for v in graph.outputs if v not in dropped and v.name != "logits"]
            stream.name = STREAM
            graph.outputs.clear()
            graph.outputs.extend([stream, *kept])
        else:
            embeds = next(v for v in graph.inputs if v.name == "inputs_embeds")
            redirect_uses(stream, embeds, list(stream.uses()))
            embeds.name = STREAM
            kept = [v for v in graph.outputs if v not in before]
            graph.outputs.clear()
            graph.outputs.extend(kept)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        names = {v.name for v in graph.outputs}
        if self.part == "head" and (STREAM not in names or "logits" in names):
            raise GraphRewriteError("cut_prefill: the head graph must end with the stream and have no logits")
        if self.part == "tail" and "logits" not in names:
            raise GraphRewriteError("cut_prefill: the tail graph lost its logits")
        for layer in self.layout.layers:
            wanted = (layer.index < self.layer) == (self.part == "head")
            if (layer.softmax.graph is graph) != wanted:
                state = "remains" if not wanted else "is gone"
                raise GraphRewriteError(f"cut_prefill: decoder layer {layer.index} {state} in the {self.part} graph")
