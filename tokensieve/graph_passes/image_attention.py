"""Graph pass: the last prompt position's attention mass on the image tokens, as an output of an MLLM **prefill**
graph (DyVTE's training-free exit score).

Matches: decoder layer ``layer`` of a prefill graph (:func:`tokensieve.graph_passes.locate_decoder.scoring_layout`)
and its ``Softmax`` (the probabilities, which the eager-attention prefill graph materialises).

Inserts (semantics: :mod:`tokensieve.methods.dyvte`): a graph input ``image_positions [I]`` (int64; empty once the
image is gone) and the output ``image_attention_mass [1]``: the ``Softmax`` output's last row, image columns
(``Gather``), summed over them, mean over heads (0 for an empty image).

Preconditions (``requires``): a prefill graph; ``0 <= layer < layers``; the layer's logits are ``Q·Kᵀ`` plus the
causal mask (the last row is then unmasked). Postconditions (``ensures``): the output exists with shape ``[1]``;
the graph's other outputs are untouched.
"""

from __future__ import annotations

import onnx_ir as ir

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes.builder import NodeBuilder, record_site, typed
from tokensieve.graph_passes.locate_decoder import DecoderLayout, image_positions_input, scoring_layout
from tokensieve.methods.dyvte import DyVTE
from tokensieve.methods.faces import register

OUTPUT = "image_attention_mass"


def rows_after_image(b: NodeBuilder, image: ir.Value, probs: ir.Value) -> tuple[ir.Value, ir.Value]:
    """A 0/1 weight ``[T]`` over the rows of ``probs [1, H, T, T]`` that follow the image (from
    ``max(image_positions) + 1``; ``ReduceMax`` over the positions and ``-1``, so an empty image gives every row:
    no shape depends on the data) and the number of those rows ``[1]`` (int64)."""
    seq, real, i64 = probs.shape[2], probs.dtype, ir.DataType.INT64
    last = typed(b.op("Concat", [image, b.const([-1])], axis=0), ["image_tokens+1"], i64)
    highest = typed(b.reduce("ReduceMax", last, [0], keepdims=True), [1], i64)
    after = typed(b.op("Add", [highest, b.const([1])], "after"), [1], i64)
    length = typed(b.op("Shape", [probs], start=2, end=3), [1], i64)
    steps = typed(b.op("Range", [b.const(0), b.op("Squeeze", [length]), b.const(1)]), [seq], i64)
    typed(steps.producer().inputs[1], [], i64)
    follows = typed(b.op("GreaterOrEqual", [steps, after]), [seq], ir.DataType.BOOL)
    weight = typed(b.op("Cast", [follows], to=real), [seq], real)
    rows = typed(b.op("Sub", [length, after], "rows"), [1], i64)
    return weight, rows


@register("prefill_scores", DyVTE)
class ImageAttentionMassPass(ir.passes.InPlacePass):
    """Expose the last position's head-mean attention mass on the image tokens in layer ``layer``."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer
        self.layout: DecoderLayout | None = None

    def requires(self, model: ir.Model) -> None:
        self.layout = scoring_layout(model, self.layer, "dyvte")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, layout = model.graph, self.layout
        probs = layout.layers[self.layer].softmax.outputs[0]  # [1, H, T, T]
        seq, heads, real = probs.shape[2], layout.heads, probs.dtype
        b = NodeBuilder(model, "tokensieve/dyvte", {"tokensieve.site": str(self.layer), "tokensieve.method": "dyvte"})
        image = image_positions_input(graph)
        last = typed(
            b.op("Slice", [probs, b.const([-1]), b.const([2**62]), b.const([2])], "last_row"), [1, heads, 1, seq], real
        )
        columns = typed(b.op("Gather", [last, image], "image_columns", axis=3), [1, heads, 1, "image_tokens"], real)
        mass = typed(b.reduce("ReduceSum", columns, [3], keepdims=True), [1, heads, 1, 1], real)
        out = typed(b.reduce("ReduceMean", mass, [1, 2, 3], keepdims=False), [1], real)
        graph.extend(b.nodes)
        out.name = OUTPUT
        graph.outputs.append(out)
        record_site(model, {"layer": self.layer, "method": "dyvte", "exposed": {OUTPUT: OUTPUT}})
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if OUTPUT not in {v.name for v in model.graph.outputs}:
            raise GraphRewriteError("dyvte: the attention-mass output is missing after the pass")
