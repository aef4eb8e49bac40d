"""Graph pass: ATP-LLaVA's redundancy scores of the image tokens as outputs of an MLLM **prefill** graph.

Matches: decoder layer ``layer`` of a prefill graph (:func:`tokensieve.graph_passes.locate_decoder.locate_decoder`,
cache form ``none``), its attention logits ``MatMul`` (operands Q and Kᵀ after RoPE and scaling, GQA-expanded) and
its ``Softmax`` (the probabilities, which the eager-attention prefill graph materialises).

Inserts (semantics: :mod:`tokensieve.methods.atp_llava`):

* a graph input ``image_positions [I]`` (int64; the host knows them from ``input_ids``; empty without an image);
* output ``image_self_score [I]``: head mean of ``q_i . mean_j k_j`` over the image rows ``i`` and image keys
  ``j`` (the mean of the pre-softmax logits over the image keys, one ``MatMul`` against the mean key: no
  ``[I, I]`` matrix);
* output ``image_cross_score [I]``: the ``Softmax`` output's rows after the image (from ``max(image_positions) + 1``;
  ``ReduceMax`` over the positions and ``-1``, so an empty image gives row 0) summed with a 0/1 row weight (one
  ``MatMul``; no shape depends on the data), image columns, divided by ``max(rows, 1)`` (0 when no row follows
  the image), head mean.

Preconditions (``requires``): a prefill graph with inputs ``inputs_embeds`` and ``position_ids``;
``0 <= layer < layers``; the layer's logits are ``Q·Kᵀ`` (scaled operands) plus the causal mask. Postconditions
(``ensures``): both outputs exist with the symbolic length ``image_tokens``; the graph computes nothing else
differently (its other outputs are untouched).
"""

from __future__ import annotations

import onnx_ir as ir

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes.builder import NodeBuilder, record_site, typed
from tokensieve.graph_passes.image_attention import rows_after_image
from tokensieve.graph_passes.locate_decoder import DecoderLayout, image_positions_input, logits_matmul, scoring_layout
from tokensieve.methods.atp_llava import ATPLLaVA
from tokensieve.methods.faces import register

IMAGE_AXIS = "image_tokens"
OUTPUTS = ("image_self_score", "image_cross_score")


@register("prefill_scores", ATPLLaVA)
class ATPScoresPass(ir.passes.InPlacePass):
    """Expose ATP-LLaVA's self- and cross-modality scores of decoder layer ``layer`` (see module docstring)."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer
        self.layout: DecoderLayout | None = None

    def requires(self, model: ir.Model) -> None:
        self.layout = scoring_layout(model, self.layer, "atp_llava")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, layout = model.graph, self.layout
        scorer = layout.layers[self.layer]
        matmul = logits_matmul(scorer.softmax)
        query, keys = matmul.inputs[0], matmul.inputs[1]  # [1, H, T, d], [1, H, d, T]
        probs = scorer.softmax.outputs[0]  # [1, H, T, T]
        seq, heads, dim, real, i64 = probs.shape[2], layout.heads, layout.head_dim, query.dtype, ir.DataType.INT64
        b = NodeBuilder(
            model, "tokensieve/atp_llava", {"tokensieve.site": str(self.layer), "tokensieve.method": "atp_llava"}
        )
        image = image_positions_input(graph)

        # self: q_i . mean_j k_j over the image rows and keys, head mean
        image_query = typed(b.op("Gather", [query, image], "image_query", axis=2), [1, heads, IMAGE_AXIS, dim], real)
        image_keys = typed(b.op("Gather", [keys, image], "image_keys", axis=3), [1, heads, dim, IMAGE_AXIS], real)
        mean_key = typed(b.reduce("ReduceMean", image_keys, [3], keepdims=True), [1, heads, dim, 1], real)
        logits = typed(b.op("MatMul", [image_query, mean_key]), [1, heads, IMAGE_AXIS, 1], real)
        self_mean = typed(b.reduce("ReduceMean", logits, [1, 3], keepdims=False), [1, IMAGE_AXIS], real)
        self_score = typed(b.op("Reshape", [self_mean, b.const([-1])], "self"), [IMAGE_AXIS], real)

        # cross: the probability rows after the image (a 0/1 row weight, so no shape depends on the data), image
        # columns, mean over those rows (0 without rows) and heads
        weight, rows = rows_after_image(b, image, probs)
        weight_row = typed(b.op("Reshape", [weight, b.const([1, 1, 1, -1])], "row_weight"), [1, 1, 1, seq], real)
        summed = typed(b.op("MatMul", [weight_row, probs], "row_sum"), [1, heads, 1, seq], real)
        columns = typed(b.op("Gather", [summed, image], "columns", axis=3), [1, heads, 1, IMAGE_AXIS], real)
        head_mean = typed(b.reduce("ReduceMean", columns, [0, 1, 2], keepdims=False), [IMAGE_AXIS], real)
        at_least_one = typed(b.op("Max", [rows, b.const([1])]), [1], i64)
        divisor = typed(b.op("Cast", [at_least_one], to=real), [1], real)
        cross_score = typed(b.op("Div", [head_mean, divisor], "cross"), [IMAGE_AXIS], real)

        graph.extend(b.nodes)
        self_score.name, cross_score.name = OUTPUTS
        graph.outputs.extend([self_score, cross_score])
        record_site(model, {"layer": self.layer, "method": "atp_llava", "exposed": {n: n for n in OUTPUTS}})
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        names = {v.name for v in model.graph.outputs}
        if not set(OUTPUTS) <= names:
            raise GraphRewriteError("atp_llava: the score outputs are missing after the pass")
