"""Locate the transformer blocks of a ViT in an ONNX graph.

Analysis, not a rewrite: :func:`locate_vit` returns a :class:`ViTLayout` that graph passes insert methods into.

What it finds, per block (in topological order):

* the attention core: a ``Softmax`` over the last axis of ``[B, H, N, N]`` logits computed by a ``MatMul`` of a
  query operand ``[B, H, N, d]`` and a transposed key operand ``[B, H, d, N]`` (with scalar scaling ops in between,
  which are recorded so a pass can replay them on a subset of query rows), or a fused ONNX ``Attention`` op with
  4-D Q/K/V; an ``Add`` in that chain of a position bias that does not depend on the image (``[..., N, N]``, a
  constant or computed from weights only: BEiT's relative position bias gathered from its table) is part of the
  chain and is recorded as the block's ``position_bias``; a talking-heads mix (a linear layer over the head axis:
  ``Transpose`` to heads last, ``MatMul`` by an ``[H, H]`` weight, ``Add`` of its bias, ``Transpose`` back) before
  the ``Softmax`` is part of the chain too, and one after it is recorded as the block's ``mix_ops``, its output as
  the block's ``probs`` (the attention that multiplies V);
* further ``Softmax`` maps of the same ``[B, H, N, N]`` shape closing the same residual branch (differential
  attention, ``A1 - lambda * A2``): recorded as the block's ``maps``; the first map is the block's attention;
* the residual stream entering the block ``[B, N, C]`` and the residual ``Add`` that closes the attention branch:
  the first ``Add`` after the attention whose other input is an ancestor of the attention's query. Its output is
  the point between attention and MLP (LayerScale ``Mul`` nodes sit inside the branch and need no special case);
* the special tokens: the leading inputs of the token-axis ``Concat`` that builds the sequence before block 0
  (CLS, distillation, register tokens), counted up to the largest input (the patch tokens).

It works structurally, so graphs from the legacy TorchScript exporter (opset 14, decomposed LayerNorm, no
metadata) are handled; when the dynamo exporter's ``pkg.torch.onnx.name_scopes`` metadata is present it names each
block by its module path (``blocks.3``, ``encoder.layer.3``) and cross-checks that the residual ``Add`` belongs to
the same module. Attention used by pooling heads (a single learned query) is not a block and is skipped.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import onnx_ir as ir

from tokensieve.errors import LocateError

_SCALE_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Cast"})
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass
class AttentionBlock:
    """One transformer block's token sites."""

    index: int
    name: str
    stream_in: ir.Value
    residual_add: ir.Node
    query: ir.Value
    key: ir.Value
    key_transposed: bool
    logit_ops: list[tuple[ir.Node, int]]  # scaling ops between the logits MatMul and Softmax, with data input index
    scale: float | None
    probs: ir.Value | None
    attention: ir.Node  # the Softmax (decomposed attention) or the fused Attention op
    heads: int
    head_dim: int
    tokens: int
    position_bias: list[tuple[ir.Node, int]] = field(default_factory=list)  # Add nodes, index of the [.., N, N] bias
    # further Softmax maps of the same shape combined into this block's branch (differential attention: A1 - l*A2);
    # token scores read ``attention`` (the first map), logit biases go to every map
    maps: list[ir.Node] = field(default_factory=list)
    # talking heads: the ops after the Softmax that mix its heads (Transpose, MatMul/Add of an [H, H] weight,
    # Transpose), with data input index; ``probs`` is then their output, the attention that multiplies V
    mix_ops: list[tuple[ir.Node, int]] = field(default_factory=list)

    @property
    def attention_maps(self) -> list[ir.Node]:
        """Every attention core of the block, the scored one first."""
        return [self.attention, *self.maps]

    @property
    def post_attention(self) -> ir.Value:
        """The residual stream between attention and MLP ``[B, N, C]``."""
        return self.residual_add.outputs[0]

    @property
    def fused(self) -> bool:
        return self.probs is None

    def summary(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "tokens_in": self.tokens,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "attention": "fused Attention op" if self.fused else "MatMul+Softmax",
            "query": self.query.name,
            "key": self.key.name,
            "post_attention": self.post_attention.name,
        }


@dataclass
class ViTLayout:
    """The located blocks of a ViT graph."""

    blocks: list[AttentionBlock]
    tokens: int
    channels: int
    specials: int
    batch: int | str | None
    uses_metadata: bool
    token_axis: int = 1
    notes: list[str] = field(default_factory=list)
    pooling_attention: list[ir.Node] = field(default_factory=list)  # Softmax / Attention of pooling heads
    # tokens joined in front of the blocks' output before a pooling attention reads it (CaiT's class token enters
    # only its class-attention blocks); such a pooling attention has ``late + N`` keys, the late ones first
    late: int = 0

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def summary(self) -> dict:
        return {
            "depth": self.depth,
            "tokens": self.tokens,
            "channels": self.channels,
            "specials": self.specials,
            "batch": self.batch,
            "token_axis": self.token_axis,
            "located_with": "name_scopes metadata + structure" if self.uses_metadata else "structure",
            "blocks": [b.summary() for b in self.blocks],
        }


def _scopes(node: ir.Node) -> list[str] | None:
    text = node.metadata_props.get(_NAME_SCOPES)
    if not text:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return [str(s) for s in scopes] if isinstance(scopes, list) else None


def _static_dims(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape]


def _is_constant(value: ir.Value) -> bool:
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def _scalar_constant(value: ir.Value) -> bool:
    """A constant that broadcasts like a scalar over the last two axes."""
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return False
    dims = list(tensor.shape)
    return len(dims) < 2 or (dims[-1] == 1 and dims[-2] == 1)


def _ancestors(value: ir.Value, limit: int = 100_000) -> set[ir.Value]:
    seen: set[ir.Value] = set()
    stack = [value]
    while stack and len(seen) < limit:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        producer = v.producer()
        if producer is not None:
            stack.extend(i for i in producer.inputs if i is not None)
    return seen


def _weights_only(value: ir.Value) -> bool:
    """Computed from constants and weights only: no graph input among its ancestors."""
    seen: set[ir.Value] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        producer = v.producer()
        if producer is None and not _is_constant(v):
            return False
        if producer is not None:
            stack.extend(i for i in producer.inputs if i is not None)
    return True


def _position_bias(node: ir.Node, dims: list) -> int | None:
    """Index of ``node``'s position-bias operand: an ``Add`` of a weights-only ``[..., N, N]`` tensor to the
    logits (the other operand)."""
    if node.op_type != "Add" or len(node.inputs) != 2:
        return None
    for index, bias in enumerate(node.inputs):
        bias_dims = _static_dims(bias)
        if bias_dims is None or not 2 <= len(bias_dims) <= 4 or bias_dims[-2:] != dims[-2:]:
            continue
        if _weights_only(bias) and not _weights_only(node.inputs[1 - index]):
            return index
    return None


def _softmax_core(node: ir.Node) -> tuple[ir.Value, ir.Value, list[tuple[ir.Node, int]], list] | None:
    """For a Softmax over [B,H,N,N] logits: (query operand, transposed key operand, replayed scale ops, position
    bias ops)."""
    logits = node.inputs[0]
    dims = _static_dims(logits)
    if dims is None or len(dims) != 4 or dims[-1] != dims[-2] or not isinstance(dims[-1], int):
        return None
    axis = node.attributes.get_int("axis", -1)
    if axis not in (-1, 3):
        return None
    chain: list[tuple[ir.Node, int]] = []
    biases: list[tuple[ir.Node, int]] = []
    value = logits
    while True:
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type == "MatMul":
            query, key_t = producer.inputs
            qd, kd = _static_dims(query), _static_dims(key_t)
            if qd is None or kd is None or len(qd) != 4 or len(kd) != 4 or qd[-1] != kd[-2]:
                return None
            return query, key_t, list(reversed(chain)), biases
        if producer.op_type == "Transpose":
            mix = _mix_before(value)
            if mix is None:
                return None
            ops, value = mix
            chain.extend(reversed(ops))
            continue
        if producer.op_type not in _SCALE_OPS:
            return None
        data = [v for v in producer.inputs if v is not None and not _is_constant(v)]
        consts = [v for v in producer.inputs if v is not None and _is_constant(v)]
        bias = _position_bias(producer, dims)
        if bias is not None:
            chain.append((producer, 1 - bias))
            biases.append((producer, bias))
            value = producer.inputs[1 - bias]
            continue
        if len(data) != 1 or not all(_scalar_constant(c) for c in consts):
            if len(data) == 1:
                raise LocateError(
                    f"attention logits pass through {producer.op_type} node {producer.name!r} with a non-scalar "
                    "operand (an attention mask or bias); masked attention is not supported for ViT pruning"
                )
            return None
        chain.append((producer, list(producer.inputs).index(data[0])))
        value = data[0]


_HEADS_LAST, _HEADS_BACK = (0, 2, 3, 1), (0, 3, 1, 2)


def _perm(node: ir.Node | None, perm: tuple[int, ...]) -> bool:
    return node is not None and node.op_type == "Transpose" and tuple(node.attributes.get_ints("perm", ())) == perm


def _mix_step(node: ir.Node | None, op_type: str, heads: int | None) -> tuple[ir.Node, int] | None:
    """``node`` with its data input's index when it is ``op_type`` of the data and a constant over the head axis
    (MatMul: an ``[H, H]`` weight, second; Add: an ``[H]`` bias)."""
    if node is None or node.op_type != op_type or len(node.inputs) != 2:
        return None
    wanted = [heads, heads] if op_type == "MatMul" else [heads]
    for index, const in enumerate(node.inputs):
        dims = _static_dims(const) if _is_constant(const) else None
        if dims == wanted and (op_type == "Add" or index == 1):
            return node, 1 - index
    return None


def _sole_reader(value: ir.Value) -> ir.Node | None:
    readers = [node for node, _ in value.uses()]
    return readers[0] if len(readers) == 1 else None


def _mix_before(value: ir.Value) -> tuple[list[tuple[ir.Node, int]], ir.Value] | None:
    """The talking-heads mix producing ``[B, H, N, N]`` ``value``: a linear layer over the head axis (``Transpose``
    to heads last, ``MatMul`` by an ``[H, H]`` weight, optional ``Add`` of an ``[H]`` bias, ``Transpose`` back).
    Returns its ops in data order with their data input index, and its input (None: no such mix)."""
    back = value.producer()
    if not _perm(back, _HEADS_BACK):
        return None
    ops, end = [(back, 0)], back.inputs[0]
    for op_type in ("Add", "MatMul"):
        step = _mix_step(end.producer(), op_type, _heads(value))
        if step is not None:
            ops.append(step)
            end = step[0].inputs[step[1]]
    first = end.producer()
    if ops[-1][0].op_type != "MatMul" or not _perm(first, _HEADS_LAST):
        return None
    return [(first, 0), *reversed(ops)], first.inputs[0]


def _mix_after(value: ir.Value) -> tuple[list[tuple[ir.Node, int]], ir.Value] | None:
    """The talking-heads mix that alone reads ``[B, H, N, N]`` ``value`` (as :func:`_mix_before`), and its output."""
    first = _sole_reader(value)
    if not _perm(first, _HEADS_LAST):
        return None
    ops = [(first, 0)]
    for op_type in ("MatMul", "Add"):
        end = ops[-1][0].outputs[0]
        step = _mix_step(_sole_reader(end), op_type, _heads(value))
        if step is not None and step[0].inputs[step[1]] is end:
            ops.append(step)
    back = _sole_reader(ops[-1][0].outputs[0])
    if len(ops) < 2 or ops[1][0].op_type != "MatMul" or not _perm(back, _HEADS_BACK):
        return None
    return [*ops, (back, 0)], back.outputs[0]


def _heads(value: ir.Value) -> int | None:
    dims = _static_dims(value)
    return dims[1] if dims is not None and len(dims) == 4 else None


def _fused_core(node: ir.Node) -> tuple[ir.Value, ir.Value, float | None] | None:
    """For a fused ONNX Attention op with 4-D Q/K/V and no mask: (Q, K, scale or None for 1/sqrt(d))."""
    if len(node.inputs) < 3 or any(v is not None for v in node.inputs[3:]):
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            raise LocateError(f"fused Attention node {node.name!r} has an attention mask; not supported for ViTs")
        return None
    query, key = node.inputs[0], node.inputs[1]
    qd, kd = _static_dims(query), _static_dims(key)
    if qd is None or kd is None or len(qd) != 4 or len(kd) != 4 or qd[-2] != kd[-2]:
        return None
    if node.attributes.get_int("is_causal", 0):
        return None
    scale = node.attributes.get_float("scale", None)
    return query, key, scale


def _residual_add(start: ir.Value, query_ancestors: set[ir.Value]) -> tuple[ir.Node, ir.Value] | None:
    """First Add after ``start`` whose other input is an ancestor of the attention's query (the stream)."""
    queue, seen = deque([start]), {start}
    while queue and len(seen) < 200:
        value = queue.popleft()
        for node, _ in value.uses():
            if node.op_type == "Add" and len(node.inputs) == 2:
                for i, other in enumerate(node.inputs):
                    if node.inputs[1 - i] is value and other in query_ancestors and not _is_constant(other):
                        od, nd = _static_dims(other), _static_dims(node.outputs[0])
                        if od is not None and len(od) == 3 and od == nd:
                            return node, other
            for out in node.outputs:
                if out not in seen:
                    seen.add(out)
                    queue.append(out)
    return None


def _count_specials(stream: ir.Value, tokens: int) -> tuple[int, str]:
    """Special tokens = leading inputs of the token-axis Concat that builds the sequence before block 0."""
    queue, seen = deque([(stream, 0)]), {stream}
    while queue:
        value, depth = queue.popleft()
        producer = value.producer()
        if producer is None or depth > 60:
            continue
        dims = _static_dims(value)
        if producer.op_type == "Concat" and dims is not None and len(dims) == 3:
            axis = producer.attributes.get_int("axis", 0)
            if axis in (1, -2):
                sizes = []
                for v in producer.inputs:
                    d = _static_dims(v)
                    if d is None or not isinstance(d[1], int):
                        raise LocateError(f"token Concat {producer.name!r} has inputs of unknown length")
                    sizes.append(d[1])
                # the patch tokens: the largest input, the last of several as large (a 1-patch image: [CLS, patch])
                largest = max(range(len(sizes)), key=lambda i: (sizes[i], i))
                if largest != len(sizes) - 1:
                    raise LocateError(
                        f"token Concat {producer.name!r} puts {sum(sizes[largest + 1 :])} tokens after the patch "
                        "tokens; only leading special tokens (CLS, registers) are supported"
                    )
                return sum(sizes[:largest]), producer.name or "Concat"
        for v in producer.inputs:
            if v is None or v in seen or _is_constant(v):
                continue
            if _static_dims(v) == dims:
                seen.add(v)
                queue.append((v, depth + 1))
    return 0, "no token Concat before block 0"


def _block_name(node: ir.Node, index: int, add_scopes: list[str]) -> tuple[str, str | None]:
    """The block's and its attention's module scopes from an attention op's scopes (the op's own name last): the
    block is two levels up, or three where the attention module wraps a self-attention module (HF
    Data2Vec-vision's ``layer.attention.attention``) and only that outer scope holds the residual ``Add``."""
    scopes = _scopes(node)
    if not scopes or len(scopes) < 3:
        return f"block{index}", None
    if scopes[-3] not in add_scopes and len(scopes) >= 4 and scopes[-4] in add_scopes:
        return scopes[-4], scopes[-3]
    return scopes[-3], scopes[-2]


def locate_vit(model: ir.Model, specials: int | None = None) -> ViTLayout:
    """Find the blocks, token axis, token count and special tokens of a ViT graph (shapes must be annotated)."""
    graph = model.graph
    cores = _attention_cores(graph)
    if not cores:
        raise LocateError(
            "no self-attention found: expected Softmax over [B, H, N, N] logits from MatMul(Q, K^T), or an ONNX "
            f"Attention op; {_unmatched(graph) or 'is this a transformer (ViT) graph?'}"
        )
    blocks: list[AttentionBlock] = []
    uses_metadata = False
    for core in cores:
        block, scoped = _block(core, blocks)
        if block is not None:
            blocks.append(block)
            uses_metadata |= scoped
    if not blocks:
        raise LocateError("found attention ops but no residual blocks around them; not a ViT-style encoder")
    first = _static_dims(blocks[0].stream_in)
    tokens, channels = first[1], first[2]
    for block in blocks:
        dims = _static_dims(block.stream_in)
        if dims[2] != channels or dims[1] != tokens:
            raise LocateError(
                f"block {block.name} sees {dims[1]} tokens x {dims[2]} channels, block 0 {tokens} x {channels}; "
                "the graph is already token-reduced or is not a plain ViT"
            )
    notes = []
    if specials is None:
        specials, how = _count_specials(blocks[0].stream_in, tokens)
        notes.append(f"special tokens: {specials} ({how})")
    elif not 0 <= specials < tokens:
        raise LocateError(f"specials={specials} is out of range for {tokens} tokens")
    late = _late_tokens(graph, blocks[-1], int(tokens))
    return ViTLayout(
        blocks=blocks,
        tokens=int(tokens),
        channels=int(channels),
        specials=specials,
        batch=first[0],
        uses_metadata=uses_metadata,
        notes=notes,
        pooling_attention=_pooling_attention(graph, blocks[-1], int(tokens), specials, late),
        late=late,
    )


def _unmatched(graph: ir.Graph) -> str | None:
    """Why a Softmax over square 4-D logits is not a self-attention core: the first op between it and the logits
    MatMul that is neither a scaling op nor a position bias (None: no such Softmax)."""
    for node in graph:
        dims = _static_dims(node.inputs[0]) if node.op_type == "Softmax" and node.inputs else None
        if dims is None or len(dims) != 4 or dims[-1] != dims[-2]:
            continue
        producer = node.inputs[0].producer()
        while producer is not None and producer.op_type in _SCALE_OPS:
            producer = next((v.producer() for v in producer.inputs if v is not None and not _is_constant(v)), None)
        if producer is not None and producer.op_type != "MatMul":
            return (
                f"Softmax {node.name!r} over {dims} logits is reached through {producer.op_type} node "
                f"{producer.name!r}, not from the Q·Kᵀ MatMul through scaling ops; attention that mixes heads "
                "around the Softmax is supported only as a linear layer over the head axis (talking heads)"
            )
    return None


class _Core(NamedTuple):
    """One self-attention core before its block is known."""

    node: ir.Node  # the Softmax, or the fused Attention op
    query: ir.Value
    key: ir.Value  # K^T for a Softmax core, K for a fused one
    transposed: bool
    chain: list[ir.Node]  # logit ops between the QK MatMul and the Softmax
    scale: float | None  # a fused op's scale attribute
    probs: ir.Value | None  # the attention probabilities (Softmax cores; after a talking-heads mix, its output)
    position_bias: tuple[tuple[ir.Node, int], ...] = ()  # position-bias Adds among the logit ops, the bias index
    mix_ops: tuple[tuple[ir.Node, int], ...] = ()  # a talking-heads mix after the Softmax


def _attention_cores(graph: ir.Graph) -> list[_Core]:
    """Every self-attention core: Softmax over MatMul(Q, K^T) logits, or a fused ONNX Attention op."""
    cores = []
    for node in graph:
        if node.op_type == "Softmax" and node.domain in ("", "ai.onnx"):
            core = _softmax_core(node)
            if core is not None:
                query, key_t, chain, biases = core
                mix = _mix_after(node.outputs[0])
                ops, probs = mix if mix is not None else ([], node.outputs[0])
                cores.append(_Core(node, query, key_t, True, chain, None, probs, tuple(biases), tuple(ops)))
        elif node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            fused = _fused_core(node)
            if fused is not None:
                query, key, scale = fused
                cores.append(_Core(node, query, key, False, [], scale, None))
    return cores


def _block(core: _Core, blocks: list[AttentionBlock]) -> tuple[AttentionBlock | None, bool]:
    """The residual block around one attention core (``None`` without a residual stream around it), and whether the
    exporter's name-scope metadata named it."""
    node, query, key, transposed, chain, scale, probs, position_bias, mix_ops = core
    found = _residual_add(node.outputs[0], _ancestors(query))
    if found is None:
        return None, False
    add, stream_in = found
    shared = next((b for b in blocks if b.residual_add is add), None)
    if shared is not None:
        _add_map(shared, core)
        return None, False
    qd, sd = _static_dims(query), _static_dims(stream_in)
    index = len(blocks)
    add_scopes = _scopes(add) or []
    name, attn_scope = _block_name(node, index, add_scopes)
    if attn_scope is not None and (name not in add_scopes or attn_scope in add_scopes):
        raise LocateError(
            f"block {name}: the residual Add found structurally ({add.name!r}) is not in module {name} "
            "according to the exporter's metadata; the graph's structure is ambiguous"
        )
    if sd[1] != qd[-2]:
        raise LocateError(f"block {name}: attention runs over {qd[-2]} tokens but the residual stream has {sd[1]}")
    block = AttentionBlock(
        index=index,
        name=name,
        stream_in=stream_in,
        residual_add=add,
        query=query,
        key=key,
        key_transposed=transposed,
        logit_ops=chain,
        scale=scale,
        probs=probs,
        attention=node,
        heads=int(qd[1]),
        head_dim=int(qd[-1]),
        tokens=int(sd[1]),
        position_bias=list(position_bias),
        mix_ops=list(mix_ops),
    )
    return block, attn_scope is not None


def _add_map(block: AttentionBlock, core: _Core) -> None:
    """A further attention map feeding ``block``'s residual branch (differential attention): accepted when both
    are decomposed ``Softmax`` maps of the same ``[B, H, N, N]`` shape."""
    node = core.node
    mixed = block.mix_ops or core.mix_ops
    if block.fused or node.op_type != "Softmax" or node.outputs[0].shape != block.attention.outputs[0].shape or mixed:
        raise LocateError(
            f"block {block.name} has attention maps of different kinds or shapes feeding one residual branch "
            f"({block.attention.name!r}, {node.name!r}); only maps of one [B, H, N, N] shape can be combined"
        )
    block.maps.append(node)
    block.position_bias.extend(core.position_bias)


def pooling_keys(node: ir.Node) -> tuple[int | str | None, int | str | None] | None:
    """(queries, keys) of an attention core: a Softmax's logits ``[..., q, N]`` or a fused ``Attention`` op's
    ``Q [..., q, d]`` and ``K [..., N, d]``; ``None`` without static ranks."""
    if node.op_type == "Softmax":
        dims = _static_dims(node.inputs[0])
        return (dims[-2], dims[-1]) if dims and len(dims) in (3, 4) else None
    query, key = _static_dims(node.inputs[0]), _static_dims(node.inputs[1])
    return (query[-2], key[-2]) if query and key and len(query) == len(key) == 4 else None


def _late_tokens(graph: ir.Graph, last: AttentionBlock, tokens: int) -> int:
    """Tokens a token-axis ``Concat`` after the last block puts in front of the blocks' ``N`` output tokens (its
    last input, downstream of the last block): CaiT's class token, which joins for its class-attention blocks."""
    downstream = {last.post_attention}
    for node in graph:
        if any(v in downstream for v in node.inputs if v is not None):
            downstream.update(node.outputs)
        dims = _static_dims(node.outputs[0]) if node.op_type == "Concat" and node.outputs else None
        if dims is None or len(dims) != 3 or node.attributes.get_int("axis", 0) not in (1, -2):
            continue
        end = _static_dims(node.inputs[-1])
        if node.inputs[-1] in downstream and end is not None and end[1] == tokens and isinstance(dims[1], int):
            return dims[1] - tokens
    return 0


def _pooling_attention(
    graph: ir.Graph, last: AttentionBlock, tokens: int, specials: int, late: int = 0
) -> list[ir.Node]:
    """Softmax nodes (or fused ``Attention`` ops) after the last block that attend from a few learned queries over
    the N tokens, over the N - S tokens after the special ones (MAP heads: HF SigLIP's, timm's
    ``global_pool='map'``), or over ``late`` tokens joined in front of the N (CaiT's class attention)."""
    upstream = _ancestors(last.post_attention)
    keys = {tokens, tokens - specials} | ({tokens + late} if late else set())
    found = []
    for node in graph:
        if node.op_type not in ("Softmax", "Attention") or node.inputs[0] in upstream:
            continue
        dims = pooling_keys(node)
        if dims is not None and dims[1] in keys and dims[0] not in keys:
            found.append(node)
    return found
