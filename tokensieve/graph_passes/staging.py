"""Graph pass: cut a ViT at the decision sites of an adaptive method into static-shape stage graphs.

Matches: the blocks of :func:`locate_vit`; the sites are the method's ``layers`` (an adaptive method, e.g. ATP, whose
kept count is data-dependent). The decision at a site is the method's
``"site_decision"`` face; the bucket selection after it is shared.

Builds one stage of the chain ``stage 1 -> bucketed stage 2 -> ...`` in a copy of the unreduced graph, per
:class:`StageSpec`:

* **cut in** at site ``start``: the stream at that site (``tokens [B, N, C]``), the site's ``order_key [B, n]`` and
  ``valid [B, K]`` become graph inputs; the bucket selection (:func:`sites.atp.emit_selection`, static ``K`` or K
  read from ``valid``'s shape) replaces the stream, and everything upstream is removed;
* **inline** sites (pad-to-max): decision and selection in the same graph, with ``valid`` computed in-graph for a
  constant number of slots;
* **cut out** at site ``end``: the method's ``"site_decision"`` face (ATP: :func:`sites.atp.emit_decision`) runs on
  that site's stream, and
  ``stream``, ``priority`` (the order key) and ``count`` become the graph outputs; everything downstream is
  removed;
* every attention after a selection gets ``-1e4`` on the keys of padding slots (before its ``Softmax``, or as a fused
  op's ``attn_mask``; attention-pooling heads too) and average pooling weights tokens by validity, so valid tokens
  compute exactly what exact dropping computes;
* when later blocks read rotary position tables or relative position biases (:class:`position_bias.PositionReaders`),
  each selection composes the original positions of the slots' tokens (:func:`rotary.compose_positions`; a padding
  slot takes its filler token's position, and stays masked) and every later block gathers its tables' rows / its
  bias's rows and columns at them, as the single-graph pass does. Stage 1 ends at the first site, where the
  positions are the identity; a stage cut out at a later site outputs them (``original_positions [B, K]``, padded
  like the stream) and the next stage takes them as its ``positions`` input.

Preconditions: blocks located, static token counts, a dynamic (symbolic) batch axis so a dispatcher can run
groups of any size. Postconditions: every shape is static but the batch axis (and K itself for a symbolic-K stage,
meant for the exact-count oracle and for multi-profile TensorRT engines); constants that encoded token counts are
retargeted (:mod:`propagate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes import FACES
from tokensieve.graph_passes.builder import NodeBuilder, redirect_uses
from tokensieve.graph_passes.locate import ViTLayout, locate_vit
from tokensieve.graph_passes.position_bias import PositionReaders
from tokensieve.graph_passes.propagate import propagate_shapes
from tokensieve.graph_passes.rotary import compose_positions
from tokensieve.graph_passes.sites import atp
from tokensieve.graph_passes.sites.common import SiteInput
from tokensieve.graph_passes.token_bias import bias_block, bias_pooling_heads, mask_mixed, weighted_pooling
from tokensieve.methods.base import Method, SiteCount

STAGE_INPUTS = ("tokens", "order_key", "valid", "positions")
# fed to the next stage's inputs by the dispatcher; the last only where later blocks read position tables or biases
STAGE_OUTPUTS = ("stream", "priority", "count", "original_positions")


@dataclass(frozen=True)
class StageSpec:
    start: int | None = None  # site (index into method.layers) whose selection begins this stage
    start_tokens: int | None = None  # tokens in the stream at the start site (None: symbolic)
    start_slots: int | None = None  # bucket size K at the start site (None: symbolic K)
    end: int | None = None  # site whose decision ends this stage (None: the model's outputs)
    inline: dict[int, int] = field(default_factory=dict)  # site -> slots, decided and selected in-graph


class StagePass(ir.passes.InPlacePass):
    """Turn an unreduced ViT graph into one stage of a bucketed adaptive model (see module docstring)."""

    def __init__(self, method: Method, spec: StageSpec, specials: int | None = None):
        super().__init__()
        self.method, self.spec, self.specials = method, spec, specials
        self.layout: ViTLayout | None = None

    def requires(self, model: ir.Model) -> None:
        self.layout = locate_vit(model, self.specials)
        self.method.validate(self.layout.tokens, self.layout.specials, self.layout.depth)
        batch = model.graph.inputs[0].shape[0] if model.graph.inputs[0].shape is not None else None
        if isinstance(batch, int):
            raise GraphRewriteError("stage graphs need a dynamic batch axis; export with --dynamic-batch")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layout, spec, method = self.layout, self.spec, self.method
        S, graph = layout.specials, model.graph
        batch = graph.inputs[0].shape[0]
        site_of = {layer: i for i, layer in enumerate(method.layers)}
        decide = FACES.lookup("site_decision", method)
        readers = PositionReaders.find(model, layout)
        tokens, validity, bias, positions = layout.tokens, None, None, None
        key_weights = None  # [B, 1, 1, N] validity of the keys, once a selection pads
        prev_shapes: dict[ir.Value, ir.Shape] = {}
        for block in layout.blocks:
            index = site_of.get(block.index)
            if spec.start is not None and (index is None or index < spec.start) and validity is None:
                continue  # upstream of the cut: removed below
            if bias is not None:
                bias_block(model, block, bias, f"tokensieve/valid{block.index}", "padding_mask")
                mask_mixed(model, block, key_weights, f"tokensieve/valid{block.index}_mixed")
            readers.follow(model, block, positions, S)
            if index is None:
                continue
            h = block.post_attention
            uses = list(h.uses())
            b = NodeBuilder.for_site(model, block.index, method.name)
            if index == spec.start and spec.start_tokens is not None:
                tokens = spec.start_tokens
            count = SiteCount(block.index, tokens, tokens - S, tokens)
            site = SiteInput(block, count, method, S, layout.depth, h, None, bias)
            carried = _carries(readers, index, block.index)
            if index == spec.end:
                order_key, kept = decide(b, site, first_site=index == 0, valid=validity)
                passed = [b.op("Identity", [positions])] if carried else []  # renamed below: keep site k's kept name
                b.insert_after(block.residual_add)
                self._set_outputs(graph, [h, order_key, kept, *passed])
                break
            if index == spec.start:
                stream, order_key, valid, *given = self._cut_inputs(graph, h, batch, spec, carried)
                positions = given[0] if given else None
                _batch_from_stream(graph.inputs[0], stream)
                slots = spec.start_slots
            elif index in spec.inline:
                stream, slots = h, spec.inline[index]
                order_key, kept = decide(b, site, first_site=index == 0, valid=validity)
                valid = atp.valid_slots(b, kept, slots)
            else:
                raise GraphRewriteError(f"stage spec {spec} does not say how to handle site {index}")
            out, validity, origin = atp.emit_selection(b, stream, order_key, valid, S, slots)
            if readers.after(block.index):  # later blocks read position tables or biases: they follow the slots
                positions = compose_positions(b, positions, origin, S)
            bias = atp.key_bias(b, validity, h.dtype)
            key_weights = b.unsqueeze(b.op("Cast", [validity], to=h.dtype), [1, 2])
            b.insert_after(block.residual_add)
            redirect_uses(h, out, uses)
            prev_shapes[out] = h.shape
            tokens = S + slots if slots is not None else tokens
        if spec.end is None and validity is not None:
            b = NodeBuilder(model, "tokensieve/final", {"tokensieve.method": "padding_mask"})
            weights = b.op("Cast", [validity], to=layout.blocks[-1].post_attention.dtype)
            b.graph.extend(b.nodes)
            bias_pooling_heads(model, layout, bias, "padding_mask")
            weighted_pooling(model, layout, weights, "valid_weighted_pool")
        RemoveUnusedNodesPass()(model)
        for value in list(graph.inputs):
            if not value.uses():
                graph.inputs.remove(value)
        TopologicalSortPass()(model)
        propagate_shapes(model, prev_shapes)
        RemoveUnusedNodesPass()(model)  # constants the retargeting replaced
        return ir.passes.PassResult(model, modified=True)

    def _cut_inputs(self, graph: ir.Graph, h: ir.Value, batch, spec: StageSpec, carried: bool):
        """New graph inputs replacing the stage's upstream: the stream, the order key, the slot validity and, when
        ``carried``, the original positions of the stream's non-special tokens (padding slots included)."""
        slots = spec.start_slots if spec.start_slots is not None else "slots"
        tokens = spec.start_tokens if spec.start_tokens is not None else "tokens"
        candidates = spec.start_tokens - self.layout.specials if spec.start_tokens is not None else "candidates"
        inputs = [
            ir.Value(name=STAGE_INPUTS[0], shape=ir.Shape([batch, tokens, h.shape[2]]), type=h.type),
            ir.Value(name=STAGE_INPUTS[1], shape=ir.Shape([batch, candidates]), type=h.type),
            ir.Value(name=STAGE_INPUTS[2], shape=ir.Shape([batch, slots]), type=ir.TensorType(ir.DataType.BOOL)),
        ]
        if carried:
            int64 = ir.TensorType(ir.DataType.INT64)
            inputs.append(ir.Value(name=STAGE_INPUTS[3], shape=ir.Shape([batch, candidates]), type=int64))
        graph.inputs.extend(inputs)
        return inputs

    @staticmethod
    def _set_outputs(graph: ir.Graph, values: list[ir.Value]) -> None:
        graph.outputs.clear()
        for value, name in zip(values, STAGE_OUTPUTS[: len(values)], strict=True):
            value.name = name
            graph.outputs.append(value)


def _carries(readers: PositionReaders, site: int, layer: int) -> bool:
    """Whether the stage boundary at decision site ``site`` (block ``layer``) passes the original positions of the
    stream's tokens on: blocks after it read position tables or biases, and an earlier site has reordered the
    tokens (at the first site the positions are the identity, which the next stage starts from)."""
    return site > 0 and bool(readers.after(layer))


def _batch_from_stream(image: ir.Value, stream: ir.Value) -> None:
    """Point the image's batch-size reads (``Shape(pixel_values)[0:1]``) at the cut-in stream, so a head after the
    cut that expands a learned tensor to the batch (timm's MAP head expands its latent query) needs no image."""
    for node, index in list(image.uses()):
        if node.op_type == "Shape" and node.attributes.get_int("start", 0) == 0 and node.attributes.get_int("end") == 1:
            node.replace_input_with(index, stream)
