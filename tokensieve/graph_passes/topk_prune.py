"""Graph pass: EViT-style attention-score top-k token pruning between attention and MLP.

Matches: the blocks found by :func:`tokensieve.graph_passes.locate.locate_vit`; a site is a block listed in the
method's ``layers``.

Inserts, after the residual ``Add`` that closes the block's attention branch (stream ``h`` of ``N = S + n``
tokens, ``S`` special tokens):

1. score: for ``score="cls"`` the CLS query row of the attention is recomputed from Q and K
   (``Softmax(q_cls · Kᵀ · scale)``, the block's own scaling ops replayed, ``[B, H, 1, N]``; no materialised
   attention matrix is needed, so fused ``Attention`` ops work), then averaged over heads; for
   ``score="mean_received"`` the attention each token receives, averaged over heads and query rows (the block's
   probabilities when materialised, else recomputed);
2. select: ``TopK`` (constant ``K = ceil(keep·n)`` from the method, exact integer arithmetic) over the ``n``
   candidate columns, then a second ``TopK(largest=0)`` that puts the kept indices back in ascending order;
3. gather: ``GatherND(batch_dims=1)`` of the kept candidates, ``Concat[specials, kept (, fused)]``;
   with ``fuse`` the fused token is ``MatMul(weights, candidates)`` where the weights are the scores of the pruned
   candidates (one-hot mask from ``Equal``; no scatter).

The kept positions (``[B, K]`` int64, indices into the sequence entering the site) are named
``tokensieve/site<layer>/kept`` so parity can expose them as debug outputs; the model's ``tokensieve.sites``
metadata lists the sites.

Preconditions (``requires``): the blocks can be located; token counts are static; every layer index exists.
Postconditions (``ensures``): the stream after each site has ``S + K (+1)`` tokens; every value downstream has a
static token dimension (constant Reshape targets retargeted by :mod:`propagate`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from tokensieve.errors import GraphRewriteError, LocateError
from tokensieve.graph_passes.builder import NodeBuilder, record_site, redirect_uses
from tokensieve.graph_passes.locate import AttentionBlock, ViTLayout, locate_vit
from tokensieve.graph_passes.propagate import propagate_shapes
from tokensieve.methods.topk import SiteCount, TopKPrune


def kept_value_name(layer: int) -> str:
    return f"tokensieve/site{layer}/kept"


def row_logits(b: NodeBuilder, block: AttentionBlock, q_rows: ir.Value) -> ir.Value:
    """Attention logits of the given query rows ``[B, H, r, d]`` against all keys: ``[B, H, r, N]``."""
    if block.key_transposed:
        logits = b.op("MatMul", [q_rows, block.key], "row_logits")
        for op, data_index in block.logit_ops:
            inputs = list(op.inputs)
            inputs[data_index] = logits
            attributes = {k: a.value for k, a in op.attributes.items()}
            logits = b.op(op.op_type, inputs, f"row_{op.op_type.lower()}", **attributes)
        return logits
    scale = block.scale if block.scale is not None else block.head_dim**-0.5
    np_dtype = block.query.dtype.numpy()
    scaled = b.op("Mul", [q_rows, b.const(np.array(scale, dtype=np_dtype), "scale", dtype=np_dtype)])
    key_t = b.op("Transpose", [block.key], perm=[0, 1, 3, 2])
    return b.op("MatMul", [scaled, key_t], "row_logits")


class TopKPrunePass(ir.passes.InPlacePass):
    """Insert attention-score top-k pruning at the method's layers (see module docstring)."""

    def __init__(self, method: TopKPrune, specials: int | None = None):
        super().__init__()
        self.method = method
        self.specials = specials
        self.layout: ViTLayout | None = None
        self.counts: list[SiteCount] = []
        self.outputs: dict[int, ir.Value] = {}

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_vit(model, self.specials)
        for block in self.layout.blocks:
            if not isinstance(block.tokens, int):
                raise LocateError(f"block {block.name}: the token count must be static, got {block.tokens!r}")
        _, self.counts = self.method.schedule(self.layout.tokens, self.layout.specials, self.layout.depth)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        assert self.layout is not None
        score = self.method.resolved_score(self.layout.specials)
        prev_shapes: dict[ir.Value, ir.Shape] = {}
        for count in self.counts:
            block = self.layout.blocks[count.layer]
            out = self._insert(model, block, count, score)
            self.outputs[count.layer] = out
            prev_shapes[out] = block.post_attention.shape
            record_site(
                model,
                {
                    "layer": count.layer,
                    "block": block.name,
                    "method": self.method.name,
                    "score": score,
                    "tokens_in": count.tokens_in,
                    "candidates": count.candidates,
                    "kept": count.kept,
                    "tokens_out": count.tokens_out,
                    "kept_indices": kept_value_name(count.layer),
                },
            )
        TopologicalSortPass()(model)
        propagate_shapes(model, prev_shapes)
        return ir.passes.PassResult(model, modified=True)

    def _insert(self, model: ir.Model, block: AttentionBlock, count: SiteCount, score: str) -> ir.Value:
        S, N, n, K = self.layout.specials, count.tokens_in, count.candidates, count.kept
        h = block.post_attention
        uses = list(h.uses())
        b = NodeBuilder(
            model,
            f"tokensieve/site{count.layer}",
            {"tokensieve.site": str(count.layer), "tokensieve.method": self.method.name},
        )
        if score == "cls":
            q_cls = b.slice(block.query, 0, 1, axis=2)
            probs = b.op("Softmax", [row_logits(b, block, q_cls)], axis=-1)
        else:
            probs = block.probs or b.op("Softmax", [row_logits(b, block, block.query)], axis=-1)
        scores = b.reduce("ReduceMean", probs, [1, 2], keepdims=False)  # [B, N]
        if S:
            scores = b.slice(scores, S, N, axis=1)  # [B, n]
        _, top = b.op("TopK", [scores, b.const([K], "k")], "select", num_outputs=2, axis=-1, largest=1, sorted=1)
        local, _ = b.op("TopK", [top, b.const([K], "k")], "order", num_outputs=2, axis=-1, largest=0, sorted=1)
        kept = b.op("Add", [local, b.const(S, "offset")]) if S else b.op("Identity", [local])
        kept.name = kept_value_name(count.layer)
        parts = [b.slice(h, 0, S, axis=1)] if S else []
        parts.append(b.op("GatherND", [h, b.unsqueeze(kept, [-1])], "gather", batch_dims=1))
        if self.method.fused_token(K, n):
            parts.append(self._fused_token(b, h, scores, local, count))
        out = b.op("Concat", parts, "tokens", axis=1)
        b.insert_after(block.residual_add)
        redirect_uses(h, out, uses)
        return out

    def _fused_token(
        self, b: NodeBuilder, h: ir.Value, scores: ir.Value, local: ir.Value, count: SiteCount
    ) -> ir.Value:
        S, N, n = self.layout.specials, count.tokens_in, count.candidates
        np_dtype = h.dtype.numpy()
        candidates = b.slice(h, S, N, axis=1) if S else h
        hit = b.op("Equal", [b.unsqueeze(local, [-1]), b.const(np.arange(n), "candidate_ids")])  # [B, K, n]
        kept_mask = b.reduce("ReduceMax", b.op("Cast", [hit], to=ir.DataType(h.dtype)), [1], keepdims=False)
        pruned = b.op("Sub", [b.const(np.array(1, dtype=np_dtype), "one", dtype=np_dtype), kept_mask])
        weights = b.op("Mul", [scores, pruned])  # [B, n]
        if self.method.fuse == "mean":
            weights = b.op("Div", [weights, b.reduce("ReduceSum", weights, [1], keepdims=True)])
        return b.op("MatMul", [b.unsqueeze(weights, [1]), candidates], "fused_token")  # [B, 1, C]

    def ensures(self, model: ir.Model) -> None:
        for count in self.counts:
            shape = self.outputs[count.layer].shape
            if shape is None or shape[1] != count.tokens_out:
                raise GraphRewriteError(
                    f"site {count.layer}: stream has shape {shape} after pruning, expected {count.tokens_out} tokens"
                )
        for node in model.graph:
            for value in node.outputs:
                if value.shape is None or any(
                    d is None or (not isinstance(d, int) and d.value is None) for d in value.shape
                ):
                    raise GraphRewriteError(
                        f"value {value.name!r} ({node.op_type}) has no static shape after pruning; "
                        "shape propagation could not follow the new token count"
                    )
