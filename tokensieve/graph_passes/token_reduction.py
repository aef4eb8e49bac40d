"""Graph pass: insert ViT token reduction (pruning and merging methods, alone or combined) into an exported graph.

Matches: the blocks located by :func:`tokensieve.graph_passes.locate.locate_vit`; a site is a block where one of the
methods reduces tokens (:func:`tokensieve.methods.schedule`).

Inserts, walking the blocks in order and threading the token state (stream, sizes) from site to site:

* at each site, after the residual ``Add`` that closes the attention branch, the method's subgraph
  (:mod:`tokensieve.graph_passes.sites`), and rewires the block's MLP half and everything downstream to its output;
* once a merging method has produced token sizes, **proportional attention**: ``log(size)`` (``[B, 1, 1, N]``) is
  added to the logits of every later block, before its ``Softmax``, or as the additive ``attn_mask`` of a fused
  ``Attention`` op (and to attention-pooling heads), when the merging method has ``prop_attn``;
* after the last block, global average pooling over tokens becomes a size-weighted mean.

The sites record themselves in the model's ``tokensieve.sites`` metadata with the names of the index tensors they
expose (``tokensieve/site<k>/kept``, ``.../src``, ``.../dst``, ...) for parity.

Preconditions (``requires``): blocks can be located with static token counts; the methods fit the model (layers in
range, tables of the right length, r within what the tokens allow) and own disjoint blocks.
Postconditions (``ensures``): the stream after each site has the scheduled number of tokens; every value has a
static shape (up to a symbolic batch), constants that encoded old token counts are retargeted (:mod:`propagate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes.builder import NodeBuilder, record_site, redirect_uses
from tokensieve.graph_passes.locate import ViTLayout, locate_vit
from tokensieve.graph_passes.propagate import propagate_shapes
from tokensieve.graph_passes.sites import EMITTERS
from tokensieve.graph_passes.sites.common import SiteInput
from tokensieve.methods.base import Method, Schedule, schedule


def _axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = ir.convenience.get_const_tensor(node.inputs[1])
        return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else list(attr.value)


class TokenReductionPass(ir.passes.InPlacePass):
    """Insert the sites of ``methods`` (see module docstring)."""

    def __init__(self, methods: Sequence[Method], specials: int | None = None):
        super().__init__()
        self.methods = list(methods)
        self.specials = specials
        self.layout: ViTLayout | None = None
        self.plan: Schedule | None = None
        self.outputs: dict[int, ir.Value] = {}

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_vit(model, self.specials)
        self.plan = schedule(self.methods, self.layout.tokens, self.layout.specials, self.layout.depth)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layout, plan = self.layout, self.plan
        prop_attn = any(m.merges and getattr(m, "prop_attn", False) for m in self.methods)
        sites = {count.layer: (method, count) for method, count in plan.sites}
        sizes: ir.Value | None = None
        bias: ir.Value | None = None
        prev_shapes: dict[ir.Value, ir.Shape] = {}
        for block in layout.blocks:
            if bias is not None:
                self._bias_attention(
                    model, block.attention, bias, f"tokensieve/prop_attn{block.index}", plan.entering[block.index]
                )
            if block.index not in sites:
                continue
            method, count = sites[block.index]
            h = block.post_attention
            uses = list(h.uses())
            b = NodeBuilder(
                model,
                f"tokensieve/site{count.layer}",
                {"tokensieve.site": str(count.layer), "tokensieve.method": method.name},
            )
            site = SiteInput(block, count, method, layout.specials, layout.depth, h, sizes, bias)
            out = EMITTERS[method.name](b, site)
            if out.sizes is not None:
                sizes = b.expose(b.op("Identity", [out.sizes]), "sizes")
                if prop_attn:
                    bias = b.unsqueeze(b.op("Log", [sizes]), [1, 2])
            b.insert_after(block.residual_add)
            redirect_uses(h, out.stream, uses)
            self.outputs[count.layer] = out.stream
            prev_shapes[out.stream] = h.shape
            record_site(
                model,
                {
                    "layer": count.layer,
                    "block": block.name,
                    "method": method.name,
                    "tokens_in": count.tokens_in,
                    "candidates": count.candidates,
                    "tokens_out": count.tokens_out,
                    "params": count.params,
                    "exposed": {**out.exposed, **({"sizes": sizes.name} if out.sizes is not None else {})},
                },
            )
        if sizes is not None:
            self._pool_with_sizes(model, sizes, bias)
        TopologicalSortPass()(model)
        propagate_shapes(model, prev_shapes)
        return ir.passes.PassResult(model, modified=bool(plan.sites))

    def _bias_attention(self, model: ir.Model, node: ir.Node, bias: ir.Value, name: str, queries: int = 1) -> None:
        """Add the ``[B, 1, 1, N]`` log-size bias to the logits entering ``node`` (Softmax or Attention; the fused
        op's ``attn_mask`` must spell out its ``queries`` rows for ONNX Runtime)."""
        b = NodeBuilder(model, name, {"tokensieve.method": "prop_attn"})
        if node.op_type == "Attention":
            mask = node.inputs[3] if len(node.inputs) > 3 else None
            rows = b.op("Expand", [bias, b.const([1, 1, queries, 1], "rows")])
            new_mask = b.op("Add", [mask, rows]) if mask is not None else rows
            if len(node.inputs) < 4:
                node.resize_inputs(4)
            b.graph.insert_before(node, b.nodes)
            node.replace_input_with(3, new_mask)
            return
        logits = node.inputs[0]
        dims = logits.shape
        if dims is not None and len(dims) == 3:  # [B*H, q, N]: heads folded into the batch (nn.MultiheadAttention)
            heads = self._folded_heads(dims[0])
            expanded = b.op("Expand", [bias, b.const([1, heads, 1, 1], "heads")])
            bias = b.op("Reshape", [expanded, b.const([-1, 1, final_tokens(self.plan)], "shape")])
        added = b.op("Add", [logits, bias], "logits")
        b.graph.insert_before(node, b.nodes)
        node.replace_input_with(0, added)

    def _folded_heads(self, dim: int | ir.SymbolicDim) -> int:
        batch = self.layout.batch
        if isinstance(dim, int) and isinstance(batch, int):
            return dim // batch
        factors = [t for t in str(getattr(dim, "value", dim)).split("*") if t.isdigit()]
        if len(factors) != 1:
            raise GraphRewriteError(f"cannot tell the number of heads of a pooling attention of batch dim {dim}")
        return int(factors[0])

    def _pool_with_sizes(self, model: ir.Model, sizes: ir.Value, bias: ir.Value | None) -> None:
        """Size-weighted token pooling after the last block, and the log-size bias on attention-pooling heads."""
        layout = self.layout
        if bias is not None:
            for i, softmax in enumerate(layout.pooling_attention):
                self._bias_attention(model, softmax, bias, f"tokensieve/prop_attn_pool{i}")
        S, N0 = layout.specials, layout.tokens
        last = layout.blocks[-1].residual_add
        after = False
        for node in list(model.graph):
            after = after or node is last
            if not after or node.op_type != "ReduceMean" or node.inputs[0].shape is None:
                continue
            dims = node.inputs[0].shape
            if len(dims) != 3 or _axes(node) not in ([1], [-2]) or dims[1] not in (N0, N0 - S):
                continue
            b = NodeBuilder(model, f"tokensieve/pool{node.name}", {"tokensieve.method": "size_weighted_pool"})
            weights = sizes if dims[1] == N0 or S == 0 else b.slice(sizes, S, final_tokens(self.plan), axis=1)
            keep = node.attributes.get_int("keepdims", 1)
            total = b.reduce("ReduceSum", b.op("Mul", [node.inputs[0], b.unsqueeze(weights, [-1])]), [1], keep)
            norm = b.reduce("ReduceSum", weights, [1], keepdims=True)
            pooled = b.op("Div", [total, norm if keep else b.op("Squeeze", [norm, b.const([1], "axes")])])
            b.graph.insert_before(node, b.nodes)
            node.outputs[0].replace_all_uses_with(pooled, replace_graph_outputs=True)

    def ensures(self, model: ir.Model) -> None:
        for method, count in self.plan.sites:
            shape = self.outputs[count.layer].shape
            if shape is None or shape[1] != count.tokens_out:
                raise GraphRewriteError(
                    f"{method.name} site {count.layer}: stream has shape {shape} after the pass, expected "
                    f"{count.tokens_out} tokens"
                )
        for node in model.graph:
            for value in node.outputs:
                if value.shape is None or any(not isinstance(d, int) and d.value is None for d in value.shape):
                    raise GraphRewriteError(
                        f"value {value.name!r} ({node.op_type}) has no static shape after the pass; shape "
                        "propagation could not follow the new token count"
                    )


def final_tokens(plan: Schedule) -> int:
    return plan.sites[-1][1].tokens_out if plan.sites else plan.entering[-1]
