"""Graph pass: MustDrop's dual-attention scores of the image tokens as outputs of an MLLM **prefill** graph.

Matches: decoder layer ``layer`` of a prefill graph (:func:`tokensieve.graph_passes.locate_decoder.scoring_layout`)
and its ``Softmax`` (the probabilities, which the eager-attention prefill graph materialises).

Inserts (semantics: :mod:`tokensieve.methods.mustdrop`): a graph input ``image_positions [I]`` (int64; the image
tokens' indices in the current sequence, empty once none is left) and, from the ``Softmax`` output's image columns
(``Gather``), head mean, over the rows after the image (a 0/1 row weight, :func:`rows_after_image`: no shape depends
on the data):

* output ``image_global_attention [I]``: the column sums (``g``);
* output ``image_individual_attention [I]``: the column maxima (``m``; the probabilities are >= 0, so the rows
  weighted 0 never win; 0 when no row follows the image).

Preconditions (``requires``): a prefill graph; ``0 <= layer < layers``; the layer's logits are ``Q·Kᵀ`` plus the
causal mask. Postconditions (``ensures``): both outputs exist; the graph's other outputs are untouched.
"""

from __future__ import annotations

import onnx_ir as ir

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes.builder import NodeBuilder, record_site, typed
from tokensieve.graph_passes.image_attention import rows_after_image
from tokensieve.graph_passes.locate_decoder import DecoderLayout, image_positions_input, scoring_layout
from tokensieve.methods.faces import register
from tokensieve.methods.mustdrop import MustDrop

OUTPUTS = ("image_global_attention", "image_individual_attention")


@register("prefill_scores", MustDrop)
class DualAttentionPass(ir.passes.InPlacePass):
    """Expose MustDrop's global (column sum) and individual (column max) attention of layer ``layer``."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer
        self.layout: DecoderLayout | None = None

    def requires(self, model: ir.Model) -> None:
        self.layout = scoring_layout(model, self.layer, "mustdrop")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        probs = self.layout.layers[self.layer].softmax.outputs[0]  # [1, H, T, T]
        seq, heads, real = probs.shape[2], self.layout.heads, probs.dtype
        b = NodeBuilder(
            model, "tokensieve/mustdrop", {"tokensieve.site": str(self.layer), "tokensieve.method": "mustdrop"}
        )
        image = image_positions_input(graph)
        columns = typed(b.op("Gather", [probs, image], "image_columns", axis=3), [1, heads, seq, "image_tokens"], real)
        head_mean = typed(b.reduce("ReduceMean", columns, [0, 1], keepdims=False), [seq, "image_tokens"], real)
        weight, _ = rows_after_image(b, image, probs)
        weight_column = typed(b.op("Unsqueeze", [weight, b.const([1])]), [seq, 1], real)
        after = typed(b.op("Mul", [head_mean, weight_column], "rows_after_image"), [seq, "image_tokens"], real)
        total = typed(b.reduce("ReduceSum", after, [0], keepdims=False), ["image_tokens"], real)
        peak = typed(b.reduce("ReduceMax", after, [0], keepdims=False), ["image_tokens"], real)
        graph.extend(b.nodes)
        total.name, peak.name = OUTPUTS
        graph.outputs.extend([total, peak])
        record_site(model, {"layer": self.layer, "method": "mustdrop", "exposed": {n: n for n in OUTPUTS}})
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if not set(OUTPUTS) <= {v.name for v in model.graph.outputs}:
            raise GraphRewriteError("mustdrop: the dual-attention outputs are missing after the pass")
