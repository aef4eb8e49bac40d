"""Per-token weights after a reduction: additive attention-logit biases and weighted token pooling.

Two passes need them: :mod:`token_reduction` (``log(size)`` of merged tokens, proportional attention) and
:mod:`staging` (``-1e4`` on the padding slots of a bucket, so valid tokens equal exact dropping). Both add a
``[B, 1, 1, N]`` bias on the key axis of every later attention -- before the ``Softmax`` of decomposed attention,
as the additive ``attn_mask`` of a fused ``Attention`` op, and on attention-pooling heads whose heads are folded into
the batch -- and turn global average pooling over tokens into a weighted mean.
"""

from __future__ import annotations

import onnx_ir as ir

from tokensieve.graph_passes.builder import NodeBuilder
from tokensieve.graph_passes.locate import AttentionBlock, ViTLayout, pooling_keys


def _axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        tensor = ir.convenience.get_const_tensor(node.inputs[1])
        return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else list(attr.value)


def add_logit_bias(
    model: ir.Model, node: ir.Node, bias: ir.Value, name: str, purpose: str, heads: int | None = None
) -> None:
    """Add ``bias [B, 1, 1, N]`` to the logits entering ``node`` (a Softmax or a fused Attention op).

    A fused op's ``attn_mask`` is expanded to the query's row count (ONNX Runtime does not broadcast that axis).
    ``heads``: for ``[B*H, q, N]`` logits (``nn.MultiheadAttention`` folds heads into the batch), the head count.
    """
    b = NodeBuilder(model, name, {"tokensieve.method": purpose})
    if node.op_type == "Attention":
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        rows = b.slice(b.op("Shape", [node.inputs[0]]), 2, 3, axis=0)
        target = b.op("Concat", [b.const([1, 1], "ones"), rows, b.const([1], "one")], axis=0)
        expanded = b.op("Expand", [bias, target])
        new_mask = b.op("Add", [mask, expanded]) if mask is not None else expanded
        if len(node.inputs) < 4:
            node.resize_inputs(4)
        b.graph.insert_before(node, b.nodes)
        node.replace_input_with(3, new_mask)
        return
    logits = node.inputs[0]
    if logits.shape is not None and len(logits.shape) == 3:  # [B*H, q, N]
        shape = b.op("Shape", [logits])
        split = b.op("Concat", [b.const([-1, heads], "batch_heads"), b.slice(shape, 1, 3, axis=0)], axis=0)
        added = b.op("Add", [b.op("Reshape", [logits, split]), bias])
        added = b.op("Reshape", [added, shape], "logits")
    else:
        added = b.op("Add", [logits, bias], "logits")
    b.graph.insert_before(node, b.nodes)
    node.replace_input_with(0, added)


def bias_block(model: ir.Model, block: AttentionBlock, bias: ir.Value, name: str, purpose: str) -> None:
    """``bias [B, 1, 1, N]`` on the logits of every attention map of ``block`` (differential attention: both)."""
    for j, node in enumerate(block.attention_maps):
        add_logit_bias(model, node, bias, f"{name}_map{j}" if j else name, purpose)


def mask_mixed(model: ir.Model, block: AttentionBlock, weights: ir.Value, name: str) -> None:
    """``weights [B, 1, 1, N]`` (1 on valid keys, 0 on padding) times the attention of a talking-heads ``block``
    after its post-softmax mix (a no-op without one): the mix adds its bias to every key, padding keys included,
    which a logit bias cannot remove."""
    if not block.mix_ops:
        return
    b = NodeBuilder(model, name, {"tokensieve.method": "padding_mask"})
    probs = block.probs
    uses = list(probs.uses())
    masked = b.op("Mul", [probs, weights], "mixed")
    b.graph.insert_after(probs.producer(), b.nodes)
    for node, index in uses:
        node.replace_input_with(index, masked)
    block.probs = masked


def folded_heads(dim: int | ir.SymbolicDim, batch: int | str | None) -> int:
    """H from the ``B*H`` leading dim of folded-head logits (static batch, or a ``batch*H`` symbol)."""
    if isinstance(dim, int) and isinstance(batch, int):
        return dim // batch
    factors = [t for t in str(getattr(dim, "value", dim)).split("*") if t.isdigit()]
    if len(factors) != 1:
        raise ValueError(f"cannot tell the number of heads from a pooling attention batch dim {dim}")
    return int(factors[0])


def bias_pooling_heads(model: ir.Model, layout: ViTLayout, bias: ir.Value, purpose: str) -> None:
    """``bias [B, 1, 1, N]`` on every attention-pooling head; a head that pools the tokens after the special ones
    (timm's MAP head on a ViT with a CLS token) gets the bias of those tokens only, one that attends over tokens
    joined in front of them (CaiT's class attention) gets 0 on those. Call before shapes are re-inferred: the head's
    logits still hold the unreduced token count."""
    S, N0, late = layout.specials, layout.tokens, layout.late
    for i, node in enumerate(layout.pooling_attention):
        dims = node.inputs[0].shape
        folded = node.op_type == "Softmax" and dims is not None and len(dims) == 3
        heads = folded_heads(dims[0], layout.batch) if folded else None
        name = f"tokensieve/{purpose}_pool{i}"
        keys, count = bias, (pooling_keys(node) or (None, None))[1]
        if (S and count == N0 - S) or (late and count == N0 + late):
            b = NodeBuilder(model, f"{name}_keys", {"tokensieve.method": purpose})
            if count == N0 - S:
                keys = b.slice(bias, S, 2**62, axis=3)
            else:
                keys = b.op("Pad", [bias, b.const([0, 0, 0, late, 0, 0, 0, 0], "late_pads")])
            b.graph.insert_before(node, b.nodes)
        add_logit_bias(model, node, keys, name, purpose, heads=heads)


def weighted_pooling(model: ir.Model, layout: ViTLayout, weights: ir.Value, purpose: str) -> None:
    """Global average pooling over tokens after the last block -> ``sum(w·x) / sum(w)`` with ``weights [B, N]``
    (covering every token; sliced past the special tokens when the pool skips them)."""
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
        b = NodeBuilder(model, f"tokensieve/pool{node.name}", {"tokensieve.method": purpose})
        w = weights if dims[1] == N0 or S == 0 else b.slice(weights, S, 2**62, axis=1)
        keep = node.attributes.get_int("keepdims", 1)
        total = b.reduce("ReduceSum", b.op("Mul", [node.inputs[0], b.unsqueeze(w, [-1])]), [1], keep)
        norm = b.reduce("ReduceSum", w, [1], keepdims=True)  # [B, 1]: divides [B, C], or [B, 1, C] once unsqueezed
        pooled = b.op("Div", [total, b.unsqueeze(norm, [-1]) if keep else norm])
        b.graph.insert_before(node, b.nodes)
        mean = node.outputs[0]
        if mean.is_graph_output():  # the pooled features are the model's output: the weighted pool keeps its name
            name, mean.name = mean.name, f"{mean.name}/unweighted"
            pooled.name = name
        mean.replace_all_uses_with(pooled, replace_graph_outputs=True)
