"""Graph pass: insert ViT token reduction (pruning and merging methods, alone or combined) into an exported graph.

Matches: the blocks located by :func:`tokensieve.graph_passes.locate.locate_vit`; a site is a block where one of the
methods reduces tokens (:func:`tokensieve.methods.schedule`).

Inserts, walking the blocks in order and threading the token state (stream, sizes) from site to site:

* at each site, after the residual ``Add`` that closes the attention branch, the method's subgraph
  (:mod:`tokensieve.graph_passes.sites`), and rewires the block's MLP half and everything downstream to its output;
* once a merging method has produced token sizes, **proportional attention**: ``log(size)`` (``[B, 1, 1, N]``) is
  added to the logits of every later block, before its ``Softmax``, or as the additive ``attn_mask`` of a fused
  ``Attention`` op (and to attention-pooling heads), when the merging method has ``prop_attn``;
* after the last block, global average pooling over tokens becomes a size-weighted mean;
* when later blocks read rotary position tables (:mod:`tokensieve.graph_passes.rotary`), each site says which
  incoming position every output token keeps (``origin``); the original positions are composed from site to site
  and every later block's tables are gathered at them, so queries and keys keep their own rotation;
* likewise, when later blocks add a relative position bias to their logits (:mod:`position_bias`), its rows and
  columns are gathered at the same original positions;
* with ``restore`` (``"auto"``: when a reader of a block output folds the tokens into a spatial grid), the source
  map and the dropped rows are threaded through the sites and the full grid is rebuilt before every reader of a
  block output outside the block chain (:mod:`restore`); size-weighted pooling and pooling-head biases are then not
  added (the readers see one row per patch).

The sites record themselves in the model's ``tokensieve.sites`` metadata with the names of the index tensors they
expose (``tokensieve/site<k>/kept``, ``.../src``, ``.../dst``, ...) for parity.

Preconditions (``requires``): blocks can be located with static token counts; the methods fit the model (layers in
range, tables of the right length, r within what the tokens allow) and own disjoint blocks.
Postconditions (``ensures``): the stream after each site has the scheduled number of tokens; every value has a
static shape (up to a symbolic batch), constants that encoded old token counts are retargeted (:mod:`propagate`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from tokensieve.errors import GraphRewriteError, LocateError, MethodSpecError
from tokensieve.graph_passes import FACES
from tokensieve.graph_passes.builder import NodeBuilder, record_site, redirect_uses
from tokensieve.graph_passes.locate import ViTLayout, locate_vit
from tokensieve.graph_passes.position_bias import BiasUse, PositionReaders
from tokensieve.graph_passes.propagate import propagate_shapes
from tokensieve.graph_passes.restore import RESTORE_KEY, GridRestore
from tokensieve.graph_passes.rotary import TableUse, compose_positions
from tokensieve.graph_passes.sites.common import SiteInput, SiteOutput
from tokensieve.graph_passes.token_bias import bias_block, bias_pooling_heads, weighted_pooling
from tokensieve.methods.base import Method, Schedule, schedule


class TokenReductionPass(ir.passes.InPlacePass):
    """Insert the sites of ``methods`` (see module docstring)."""

    def __init__(self, methods: Sequence[Method], specials: int | None = None, restore: bool | str = "auto"):
        super().__init__()
        self.methods = list(methods)
        self.specials = specials
        self.restore = restore  # True, False, or "auto": restore when the model's output is a map
        self.grid: GridRestore | None = None
        self.layout: ViTLayout | None = None
        self.plan: Schedule | None = None
        self.outputs: dict[int, ir.Value] = {}

    def requires(self, model: ir.Model) -> None:
        adaptive = [m.name for m in self.methods if getattr(m, "adaptive", False)]
        if adaptive:
            raise MethodSpecError(
                f"{', '.join(adaptive)} keeps a data-dependent number of tokens; export it with buckets "
                "(--buckets auto --calibrate DATA, or --buckets 64,96,128)"
            )
        self.layout = locate_vit(model, self.specials)
        self.plan = schedule(self.methods, self.layout.tokens, self.layout.specials, self.layout.depth)
        if self.restore and self.plan.sites:
            try:
                grid = GridRestore.locate(model, self.layout, self.plan.sites[0][1].layer)
            except LocateError:
                if self.restore is True:
                    raise
                return  # auto: a graph whose block outputs cannot be found is not a map model
            self.grid = grid if self.restore is True or grid.needs_grid() else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layout, plan = self.layout, self.plan
        prop_attn = any(m.merges and getattr(m, "prop_attn", False) for m in self.methods)
        sites = {count.layer: (method, count) for method, count in plan.sites}
        sizes: ir.Value | None = None
        bias: ir.Value | None = None
        prev_shapes: dict[ir.Value, ir.Shape] = {}
        readers = PositionReaders.find(model, layout)
        positions: ir.Value | None = None
        for block in layout.blocks:
            if bias is not None:
                bias_block(model, block, bias, f"tokensieve/prop_attn{block.index}", "prop_attn")
            readers.follow(model, block, positions, layout.specials)
            if block.index not in sites:
                continue
            method, count = sites[block.index]
            h = block.post_attention
            uses = list(h.uses())
            b = NodeBuilder.for_site(model, count.layer, method.name)
            later = readers.after(block.index)
            site = SiteInput(
                block, count, method, layout.specials, layout.depth, h, sizes, bias, bool(later), self.grid is not None
            )
            out = FACES.lookup("site_emitter", method)(b, site)
            if self.grid is not None:
                self.grid.follow(b, method, count, out)
            if later:
                positions = self._positions(b, positions, out, later[0], method, count.layer)
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
                    "exposed": {**out.exposed, **b.exposed, **({"sizes": sizes.name} if out.sizes is not None else {})},
                },
            )
        if self.grid is not None:
            model.metadata_props[RESTORE_KEY] = json.dumps(self.grid.apply())
        elif sizes is not None:
            if bias is not None:
                bias_pooling_heads(model, layout, bias, "prop_attn")
            weighted_pooling(model, layout, sizes, "size_weighted_pool")
        TopologicalSortPass()(model)
        propagate_shapes(model, prev_shapes)
        return ir.passes.PassResult(model, modified=bool(plan.sites))

    def _positions(
        self,
        b: NodeBuilder,
        positions: ir.Value | None,
        out: SiteOutput,
        use: TableUse | BiasUse,
        method: Method,
        layer: int,
    ) -> ir.Value:
        """The original positions of the non-special tokens after a site, for the rotary tables and position biases
        of later blocks."""
        if out.origin is None:
            what = "rotary position embedding" if isinstance(use, TableUse) else "relative position bias"
            raise GraphRewriteError(
                f"{use.describe()} ({what}), which must follow the tokens {method.name} keeps at "
                f"block {layer}, but the site gives no single position per output token (a fused token, or a merging "
                "method other than ToMe); export without fuse, or with tome"
            )
        return compose_positions(b, positions, out.origin, self.layout.specials)

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
