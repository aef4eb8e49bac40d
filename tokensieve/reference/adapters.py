"""How eager references reach into the blocks of each supported model family, without re-implementing them.

A :class:`BlockSpec` names a block's submodules (pre-attention norm, attention, LayerScale, pre-MLP norm, MLP)
and the two attention submodules whose outputs are the queries and keys. The reference wraps every block
in :class:`ReducingBlock`, which calls the block's *own* submodules for the attention half (passing the
proportional-attention bias through the attention's own additive-mask argument), hands the post-attention stream
plus Q/K to the method's site function, then runs the block's own MLP half on the reduced stream. So the eager
reference computes exactly the original model wherever no reduction happens (checked by a test with ``keep=1``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from tokensieve.errors import SourceError

# (attention module, queries [B, H, N, d], keys [B, H, N, d], rotary tables as the block passes them) -> (q, k)
Rotate = Callable[[nn.Module, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BlockSpec:
    norm1: str | None  # None: no norm before the attention (residual post-norm blocks norm the branch: ``ls1``)
    attn: str
    ls1: str | None
    norm2: str | None
    mlp: str | tuple[str, ...]  # the MLP submodule, or submodules applied in turn
    ls2: str | None
    query: str  # attention submodule whose output is the queries
    key: str
    heads_first: bool  # True: query/key outputs are [B, H, N, d] (timm q_norm/k_norm); False: [B, N, H*d]
    attn_returns_tuple: bool
    mask_kwarg: str  # keyword of the attention module's additive mask (used for proportional attention)
    attention_classes: frozenset[str] = frozenset()  # the attention modules supported (empty: any)
    # keyword under which the block passes its attention rotary tables (None: no rotary embedding), and how they are
    # applied to the heads-first queries and keys after ``query``/``key``: ``rotate(attention, q, k, tables)``
    rope: str | None = None
    rotate: Rotate | None = None
    # timm BEiT, VisionTransformerRelPos: Q/K are computed inside the attention (no submodule gives them): captured
    # from its fused-attention call with the whole logit bias. The value names the method (dotted below the attention)
    # returning the attention's own relative position bias; it and the shared one (``mask_kwarg``) follow the tokens
    relpos: str | None = None
    # HF BEiT: the block's logit position bias ``[1, H, N, N]`` at the original tokens, from the block and the keyword
    # arguments it was called with (its own relative position bias, and the shared one the model passes as its
    # attention mask); it follows the tokens and is added to the attention's mask (None: no such bias)
    position_bias: Callable[[nn.Module, dict], torch.Tensor | None] | None = None
    # HF Data2Vec-vision: the attention's submodule that computes the attention's own relative position bias inside
    # it (its output follows the tokens), and the block's keyword arguments the attention needs passed on
    bias_module: str | None = None
    forwarded: tuple[str, ...] = ()
    block_returns_tuple: bool = False  # the block returns ``(hidden_states, ...)`` (HF Data2Vec-vision's layer)
    # attention whose queries and keys no submodule gives alone (timm's talking heads: one ``qkv`` projection):
    # ``capture(attention, x, host bias)`` runs the attention's own forward and returns (output, its tensors)
    capture: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], tuple] | None = None


_TIMM = BlockSpec(
    "norm1",
    "attn",
    "ls1",
    "norm2",
    "mlp",
    "ls2",
    "q_norm",
    "k_norm",
    True,
    False,
    "attn_mask",
    frozenset(["Attention", "DiffAttention"]),
)
# timm's Eva blocks (EVA-02, RoPE-ViT axial and mixed, DINOv3 in timm): LayerScale as gamma parameters, rotary
# tables passed to every block (``rope=``) and applied to the queries and keys after q_norm / k_norm
_TIMM_EVA = BlockSpec(
    "norm1",
    "attn",
    "gamma_1",
    "norm2",
    "mlp",
    "gamma_2",
    "q_norm",
    "k_norm",
    True,
    False,
    "attn_mask",
    frozenset({"EvaAttention", "AttentionRope"}),
    rope="rope",
    rotate=lambda attn, q, k, rope: (rotated(attn, q, rope), rotated(attn, k, rope)),
)
# timm BEiT / BEiT v2 blocks: LayerScale as gamma parameters, a relative position bias added to the logits (the
# attention's own table, and/or a shared one passed to every block, which also carries proportional attention)
_TIMM_BEIT = replace(
    _TIMM_EVA,
    query="",
    key="",
    mask_kwarg="shared_rel_pos_bias",
    attention_classes=frozenset({"Attention"}),
    rope=None,
    rotate=None,
    relpos="_get_rel_pos_bias",
)
# timm VisionTransformerRelPos: a relative position bias per block (a table, or an MLP of log coordinates:
# ``rel_pos.get_bias``) or one shared by every block (``shared_rel_pos``)
_TIMM_RELPOS = replace(
    _TIMM_BEIT,
    ls1="ls1",
    ls2="ls2",
    mask_kwarg="shared_rel_pos",
    attention_classes=frozenset({"RelPosAttention"}),
    relpos="rel_pos.get_bias",
)


def _post_norm(spec: BlockSpec) -> BlockSpec:
    """Residual post-norm blocks (``x + norm1(attn(x))``, ``x + norm2(mlp(x))``): the norms close each branch, in the
    place of LayerScale."""
    return replace(spec, norm1=None, ls1=spec.norm1, norm2=None, ls2=spec.norm2)


def _head_mix(linear: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear layer over the head axis of ``[B, H, r, N]`` maps, as timm's talking heads apply it."""
    return lambda t: linear(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def talking_heads(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """timm ``TalkingHeadAttn``'s own forward, Q and K read from its ``qkv`` projection; the host's ``[B, 1, 1, N]``
    bias (proportional attention) is added to the output of its pre-softmax head mix ``proj_l``, right before the
    softmax, where the graph adds it."""
    captured: dict[str, torch.Tensor] = {}

    def split(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        b, n, _ = out.shape
        qkv = out.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        captured.update(q=qkv[0], k=qkv[1])

    def biased(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        return None if bias is None else out + bias.permute(0, 2, 3, 1)  # logits laid out [B, N, N, H]

    hooks = [attn.qkv.register_forward_hook(split), attn.proj_l.register_forward_hook(biased)]
    try:
        out = attn(x)
    finally:
        for hook in hooks:
            hook.remove()
    mixes = {"premix": _head_mix(attn.proj_l), "postmix": _head_mix(attn.proj_w)}
    return out, AttentionTensors(captured["q"], captured["k"], float(attn.scale), bias, **mixes)


_HF_VIT = BlockSpec(
    "layernorm_before",
    "attention",
    None,
    "layernorm_after",
    "mlp",
    None,
    "q_proj",
    "k_proj",
    False,
    True,
    "attention_mask",
)
_HF_DINOV2 = BlockSpec(
    "norm1",
    "attention",
    "layer_scale1",
    "norm2",
    "mlp",
    "layer_scale2",
    "q_proj",
    "k_proj",
    False,
    True,
    "attention_mask",
)
# HF DINOv3: (cos, sin) rotary tables over the patch tokens passed to every layer as ``position_embeddings``,
# applied with the model's own ``apply_rotary_pos_emb`` (CLS and registers unrotated)
_HF_DINOV3 = replace(_HF_DINOV2, rope="position_embeddings", rotate=lambda attn, q, k, t: hf_rotated(attn, q, k, t))


def _hf_beit_bias(block: nn.Module, kwargs: dict) -> torch.Tensor | None:
    """HF BEiT layer: the shared relative position bias it is given as ``attention_mask`` plus its own, computed by
    its own ``relative_position_bias`` module for the image's patch grid as the layer computes it."""
    if kwargs.get("interpolate_pos_encoding"):
        raise SourceError("HF BEiT with interpolate_pos_encoding: its interpolated position bias cannot follow tokens")
    shared, own = kwargs.get("attention_mask"), block.relative_position_bias
    if own is not None:
        height, width = kwargs["resolution"]
        own = own((height // block.patch_size, width // block.patch_size))
    parts = [b for b in (shared, own) if b is not None]
    return sum(parts[1:], parts[0]) if parts else None


_HF_BEIT = replace(_HF_VIT, ls1="lambda_1", ls2="lambda_2", position_bias=_hf_beit_bias)
# HF Data2Vec-vision: its self-attention (``attention.attention``) computes its own relative position bias; the shared
# one comes as the block's ``relative_position_bias`` argument, the same one proportional attention uses
_HF_DATA2VEC_VISION = replace(
    _HF_VIT,
    mlp=("intermediate", "output"),
    ls1="lambda_1",
    ls2="lambda_2",
    query="attention.query",
    key="attention.key",
    mask_kwarg="relative_position_bias",
    position_bias=lambda block, kwargs: kwargs.get("relative_position_bias"),
    bias_module="attention.relative_position_bias",
    forwarded=("resolution", "interpolate_pos_encoding"),
    block_returns_tuple=True,
)
_HF_CLIP = BlockSpec(
    "layer_norm1", "self_attn", None, "layer_norm2", "mlp", None, "q_proj", "k_proj", False, True, "attention_mask"
)
_HF_AIMV2 = BlockSpec(
    "rms_norm1", "attention", None, "rms_norm2", "ffn", None, "q_proj", "k_proj", False, True, "attention_mask"
)

BLOCK_SPECS: dict[str, BlockSpec] = {
    "Block": _TIMM,  # timm.models.vision_transformer.Block (ViT, DeiT, DeiT-III, DINOv2 in timm, ...)
    "ResPostBlock": _post_norm(_TIMM),
    "EvaBlock": _TIMM_EVA,
    "EvaBlockPostNorm": _post_norm(_TIMM_EVA),
    "DeepseekVitBlock": replace(_TIMM_EVA, ls1=None, ls2=None),  # Eva's rope attention, no LayerScale
    "RelPosBlock": _TIMM_RELPOS,
    "ResPostRelPosBlock": _post_norm(_TIMM_RELPOS),
    # timm CaiT's patch blocks: talking-heads attention, LayerScale as gamma parameters (its class-attention blocks
    # run after them, on the reduced tokens, as the model's own code)
    "LayerScaleBlock": replace(
        _TIMM_EVA, attention_classes=frozenset({"TalkingHeadAttn"}), rope=None, rotate=None, capture=talking_heads
    ),
    "timm.models.beit.Block": _TIMM_BEIT,  # module-qualified: timm's ViT block has the same class name
    "ViTLayer": _HF_VIT,
    "BeitLayer": _HF_BEIT,
    "Data2VecVisionLayer": _HF_DATA2VEC_VISION,
    "DeiTLayer": _HF_VIT,  # ViT's layer under another name (DeiT: CLS + distillation token)
    "IJepaLayer": _HF_VIT,  # ViT's layer; I-JEPA has no CLS token
    "Dinov2Layer": _HF_DINOV2,
    "Dinov2WithRegistersLayer": _HF_DINOV2,
    "DINOv3ViTLayer": _HF_DINOV3,
    "CLIPEncoderLayer": _HF_CLIP,
    "SiglipEncoderLayer": _HF_CLIP,
    "Aimv2EncoderLayer": _HF_AIMV2,
}


# Attention classes whose query/key submodules give ``maps`` queries and keys per head, each group a softmax map of
# its own, combined into one (timm's differential attention: ``A1 - lambda * A2``), laid out ``[B, H * maps, N, d]``
# as ``[B, H, maps, N, d]``: the token scores read the first map, as the graph side does
ATTENTION_MAPS: dict[str, int] = {"DiffAttention": 2}


def find_blocks(model: nn.Module) -> tuple[nn.Module, list[nn.Module], BlockSpec]:
    """The container (ModuleList/Sequential) holding the model's transformer blocks, the blocks, and their spec."""
    best: tuple[nn.Module, list[nn.Module], BlockSpec] | None = None
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        children = list(module)
        names = {_spec_key(type(c)) for c in children}
        if len(names) == 1 and (name := names.pop()) in BLOCK_SPECS and (best is None or len(children) > len(best[1])):
            best = (module, children, BLOCK_SPECS[name])
    if best is None:
        raise SourceError(
            f"{type(model).__name__}: no supported transformer blocks found; supported block classes: "
            f"{', '.join(sorted(BLOCK_SPECS))}"
        )
    attention = {type(getattr(block, best[2].attn)).__name__ for block in best[1]}
    supported = best[2].attention_classes
    if supported and not attention <= supported:
        raise SourceError(
            f"{type(model).__name__}: blocks use {', '.join(sorted(attention))}; supported in these blocks: "
            f"{', '.join(sorted(supported))} (not differential or parallel attention variants)"
        )
    return best


def _spec_key(cls: type, table: dict = BLOCK_SPECS) -> str:
    """``cls``'s key in ``table``: module-qualified where the table has it so, else the class name."""
    qualified = f"{cls.__module__}.{cls.__name__}"
    return qualified if qualified in table else cls.__name__


def special_tokens(model: nn.Module) -> int:
    """Leading special tokens (CLS, distillation, registers) of the model's token sequence: the model's own count,
    or that of the module inside it that holds the blocks' tower (a feature wrapper's ViT, a DPT's backbone)."""
    for module in model.modules():
        count = _own_special_tokens(module)
        if count is not None:
            return count
    raise SourceError(f"{type(model).__name__}: unknown number of special tokens; pass specials=...")


def _own_special_tokens(model: nn.Module) -> int | None:
    if hasattr(model, "num_prefix_tokens"):  # timm
        return int(model.num_prefix_tokens)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ("vit", "dinov2", "clip_vision_model", "clip", "beit", "data2vec-vision"):
        return 1
    if model_type in ("dinov2_with_registers", "dinov3_vit"):
        return 1 + int(config.num_register_tokens)
    if model_type == "deit":
        return 2
    if model_type in ("siglip_vision_model", "siglip", "ijepa", "aimv2_vision_model"):
        return 0
    return None


@dataclass
class AttentionTensors:
    """Per-head queries and keys ``[B, H, N, d]`` of one block, its softmax scale and additive logit bias."""

    query: torch.Tensor
    key: torch.Tensor
    scale: float
    # added to the logits: [B, 1, 1, N] log token sizes (proportional attention), or the whole [B or 1, H, N, N]
    # logit bias of a block with a relative position bias (rows: the query rows); None: no bias
    bias: torch.Tensor | None = None
    # talking heads: the attention's own mixes over the head axis of ``[B, H, r, N]`` maps, before the softmax
    # (the bias is added after it, right before the softmax) and after it (None: no mix)
    premix: Callable[[torch.Tensor], torch.Tensor] | None = None
    postmix: Callable[[torch.Tensor], torch.Tensor] | None = None

    def probs(self, rows: int | None = None) -> torch.Tensor:
        """``[B, H, r, N]`` attention of the first ``rows`` query rows (None: all) as it multiplies V: the logits,
        the pre-softmax mix, the bias, softmax, the post-softmax mix."""
        q = self.query if rows is None else self.query[:, :, :rows]
        logits = (q * self.scale) @ self.key.transpose(-2, -1)
        logits = self.premix(logits) if self.premix is not None else logits
        if self.bias is not None:
            logits = logits + self.bias[..., : q.shape[-2], :]  # a [.., N, N] bias: the query rows'
        probs = torch.softmax(logits, dim=-1)
        return self.postmix(probs) if self.postmix is not None else probs


class BlockHost(Protocol):
    """What a :class:`ReducingBlock` asks its model-level controller for."""

    sizes: torch.Tensor | None  # [B, N] token sizes after the last merge (None before any)
    specials: int  # leading special tokens

    def attention_bias(self) -> torch.Tensor | None: ...

    def reduce(self, index: int, h: torch.Tensor, attention: AttentionTensors) -> torch.Tensor: ...

    def rope_rows(self, table: torch.Tensor) -> torch.Tensor: ...

    def bias_rows(self, bias: torch.Tensor) -> torch.Tensor: ...

    def enter(self, x: torch.Tensor) -> torch.Tensor: ...

    def leave(self, out: torch.Tensor) -> torch.Tensor: ...


class ReducingBlock(nn.Module):
    """Runs ``block``'s own attention half (with the host's logit bias), lets the host reduce the stream at this
    block, then runs the block's own MLP half on the result."""

    def __init__(self, block: nn.Module, spec: BlockSpec, index: int, host: BlockHost):
        super().__init__()
        self.block, self.spec, self.index = block, spec, index
        object.__setattr__(self, "host", host)  # not a submodule: the host owns this block

    def _part(self, name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        part = None if name is None else getattr(self.block, name)
        if part is None:
            return lambda t: t
        return part if callable(part) else (lambda t: t * part)  # LayerScale as a parameter (or a float: HF BEiT)

    def forward(self, given: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mask = args[0] if args else kwargs.get("attention_mask", kwargs.get("attn_mask"))
        if (mask is not None and self.spec.position_bias is None) or kwargs.get("is_causal"):
            raise ValueError("token reduction references do not support attention masks")
        x = self.host.enter(given)
        spec, attn = self.spec, getattr(self.block, self.spec.attn)
        normed = self._part(spec.norm1)(x)
        if spec.capture is not None:
            out, attention = spec.capture(attn, normed, self.host.attention_bias())
        else:
            out, attention = (self._relpos_attention if spec.relpos else self._hooked_attention)(attn, normed, kwargs)
        if spec.attn_returns_tuple:
            out = out[0]
        h = x + self._part(spec.ls1)(out)
        h = self.host.reduce(self.index, h, attention)
        mlp = self._part(spec.norm2)(h)
        for name in (spec.mlp,) if isinstance(spec.mlp, str) else spec.mlp:
            mlp = getattr(self.block, name)(mlp)
        out = self.host.leave(h + self._part(spec.ls2)(mlp))
        out = (out,) if spec.block_returns_tuple else out
        return self._run_block_hooks((given, *args), kwargs, out)

    def _run_block_hooks(self, args: tuple, kwargs: dict, out: Any) -> Any:
        """The wrapped block's own forward hooks (its forward is not called: its submodules are), so what reads
        block outputs through hooks (Hugging Face's hidden-state capture, which DPT's backbone reads) still sees
        them."""
        block = self.block
        for key, hook in block._forward_hooks.items():
            if key in block._forward_hooks_with_kwargs:
                result = hook(block, args, kwargs, out)
            else:
                result = hook(block, args, out)
            out = out if result is None else result
        return out

    def _hooked_attention(self, attn: nn.Module, x: torch.Tensor, kwargs: dict) -> tuple:
        """The attention's output, and Q/K from the outputs of its ``query``/``key`` submodules (rotated as the
        attention rotates them, where the block passes rotary tables)."""
        spec = self.spec
        rope = kwargs.get(spec.rope) if spec.rope else None
        rope = _table_rows(self.host, rope) if rope is not None else None
        extra = {name: kwargs[name] for name in spec.forwarded if name in kwargs}
        if rope is not None:
            extra[spec.rope] = rope
        bias = self._logit_bias(kwargs)
        if bias is not None:
            extra[spec.mask_kwarg] = bias
        captured: dict[str, torch.Tensor] = {}
        hooks = self._capture_hooks(attn, captured)
        try:
            out = attn(x, **extra)
        finally:
            for hook in hooks:
                hook.remove()
        own = captured.get("own")
        bias = own if bias is None else bias if own is None else bias + own
        tensors = self._attention_tensors(attn, captured["q"], captured["k"], bias)
        if rope is not None:
            tensors.query, tensors.key = spec.rotate(attn, tensors.query, tensors.key, rope)
        return out, tensors

    def _capture_hooks(self, attn: nn.Module, captured: dict[str, torch.Tensor]) -> list:
        """Hooks recording Q and K from the ``query``/``key`` submodules, and replacing the output of the
        attention's own position-bias submodule by its rows at the tokens' positions (recorded as ``own``)."""
        spec = self.spec
        hooks = [
            attn.get_submodule(spec.query).register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
            attn.get_submodule(spec.key).register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
        ]
        if spec.bias_module:
            follow = lambda m, i, o: captured.setdefault("own", self.host.bias_rows(o))  # noqa: E731
            hooks.append(attn.get_submodule(spec.bias_module).register_forward_hook(follow))
        return hooks

    def _logit_bias(self, kwargs: dict) -> torch.Tensor | None:
        """The host's bias (proportional attention), plus the block's position bias at the tokens' positions."""
        bias = self.host.attention_bias()
        position = self.spec.position_bias(self.block, kwargs) if self.spec.position_bias else None
        if position is None:
            return bias
        position = self.host.bias_rows(position)
        return position if bias is None else position + bias

    def _relpos_attention(self, attn: nn.Module, x: torch.Tensor, kwargs: dict) -> tuple:
        """timm BEiT / RelPos attention: its own relative position bias and the shared one at the tokens' positions;
        Q, K and the whole logit bias captured from its fused-attention call, which also gets proportional
        attention."""
        shared = kwargs.get(self.spec.mask_kwarg)
        shared = self.host.bias_rows(shared) if shared is not None else None
        captured: dict[str, torch.Tensor] = {}
        with _relpos_capture(attn, self.spec.relpos, self.host, captured):
            out = attn(x, **{self.spec.mask_kwarg: shared})
        tensors = AttentionTensors(captured["q"], captured["k"], float(attn.scale), captured["bias"])
        return out, tensors

    def _attention_tensors(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, bias) -> AttentionTensors:
        if self.spec.heads_first:
            maps = ATTENTION_MAPS.get(type(attn).__name__, 1)
            if maps > 1:  # the first map's heads
                q, k = (t.unflatten(1, (-1, maps))[:, :, 0] for t in (q, k))
            return AttentionTensors(q, k, float(attn.scale), bias)
        owner = attn.get_submodule(self.spec.query.rpartition(".")[0])  # the module computing the queries
        head_dim = int(getattr(owner, "head_dim", None) or owner.attention_head_size)
        b, n, _ = q.shape
        q = q.view(b, n, -1, head_dim).transpose(1, 2)
        k = k.view(b, n, -1, head_dim).transpose(1, 2)
        scale = getattr(owner, "scaling", getattr(owner, "scale", head_dim**-0.5))
        return AttentionTensors(q, k, float(scale), bias)


@contextmanager
def _relpos_capture(attn: nn.Module, getter: str, host: BlockHost, captured: dict[str, torch.Tensor]) -> Iterator[None]:
    """While a timm BEiT / RelPos attention runs: its own relative position bias (the method ``getter`` below the
    attention; absent when that module is None) at the tokens' positions (``host.bias_rows``), and its
    fused-attention call with the host's bias (proportional attention) added, recording Q, K and the logit bias."""
    path, _, name = getter.rpartition(".")
    owner = attn
    for part in path.split(".") if path else ():
        owner = getattr(owner, part, None)
    sdpa = F.scaled_dot_product_attention

    def capture(q, k, v, attn_mask=None, **kwargs):
        bias = host.attention_bias()
        if bias is not None:
            attn_mask = bias if attn_mask is None else attn_mask + bias
        captured.update(q=q, k=k, bias=attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    if owner is not None:
        own = getattr(owner, name)
        setattr(owner, name, lambda: host.bias_rows(own()))
    attn.fused_attn, F.scaled_dot_product_attention = True, capture
    try:
        yield
    finally:
        if owner is not None:
            delattr(owner, name)
        F.scaled_dot_product_attention = sdpa


def _table_rows(host: BlockHost, tables: torch.Tensor | tuple[torch.Tensor, ...]) -> Any:
    """Rotary tables (one, or a tuple such as HF's ``(cos, sin)``) at the tokens' original positions."""
    return tuple(host.rope_rows(t) for t in tables) if isinstance(tables, tuple) else host.rope_rows(tables)


def hf_rotated(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, tables: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``[B, H, N, d]`` rotated by the attention's own module-level ``apply_rotary_pos_emb`` (HF
    towers whose rotary ``(cos, sin)`` cover the patch tokens only, the leading special tokens unrotated)."""
    apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    return apply(q, k, *tables)


def rotated(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Queries or keys ``[B, H, N, d]`` as timm's rope attention rotates them (prefix tokens unrotated), with timm's
    own rotation function and the attention's own layout flags."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    npt, half = int(attn.num_prefix_tokens), bool(getattr(attn, "rotate_half", False))
    return torch.cat([x[:, :, :npt], apply_rot_embed_cat(x[:, :, npt:], rope, half=half)], dim=2).type_as(x)


# Heads that average the patch tokens inline (no pooling method of their own to replace), by class (module-qualified
# where the name is ambiguous) -> the method that takes the tokens, and when it averages them: timm BEiT's and
# VisionTransformerRelPos's ``forward_head`` (``global_pool='avg'``) and HF BEiT's pooler (``use_mean_pooling``: it
# has a layer norm)
MEAN_POOLING_HEADS: dict[str, tuple[str, Callable[[nn.Module], bool]]] = {
    "timm.models.beit.Beit": ("forward_head", lambda m: m.global_pool == "avg"),
    "VisionTransformerRelPos": ("forward_head", lambda m: m.global_pool == "avg"),
    "BeitPooler": ("forward", lambda m: m.layernorm is not None),
}


def size_weighted_head(model: nn.Module, host: BlockHost) -> None:
    """Once tokens carry sizes, every averaging :data:`MEAN_POOLING_HEADS` head sees each patch token scaled by
    ``size · n / Σ size``, so its plain mean is the size-weighted mean, and the model's own head (norm, classifier)
    runs on that."""
    for module in model.modules():
        entry = MEAN_POOLING_HEADS.get(_spec_key(type(module), MEAN_POOLING_HEADS))
        if entry is not None:
            name, averages = entry
            setattr(module, name, _size_scaled(getattr(module, name), host, partial(averages, module)))


def _size_scaled(head: Callable, host: BlockHost, averages: Callable[[], bool]) -> Callable:
    def scaled(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if host.sizes is None or not averages():
            return head(x, *args, **kwargs)
        S = host.specials
        weights = host.sizes[:, S:]
        weights = weights * (weights.shape[1] / weights.sum(dim=1, keepdim=True))
        return head(torch.cat([x[:, :S], x[:, S:] * weights.unsqueeze(-1)], dim=1), *args, **kwargs)

    return scaled


# Attention-pooling heads that attend over every token they are given with one call of the functional
# ``scaled_dot_product_attention`` and no mask (HF AIMv2's head; timm CaiT's class attention, over its class token
# and the tokens): under merging that call gets ``log(size)`` added, 0 on keys in front of the tokens
SDPA_POOLING_HEADS = frozenset({"Aimv2AttentionPoolingHead", "ClassAttn"})


def biased_sdpa_pooling(model: nn.Module, host: BlockHost) -> None:
    """Every :data:`SDPA_POOLING_HEADS` module of ``model`` runs its own forward (its fused-attention path) with the
    host's attention bias (``[B, 1, 1, N]`` on the key axis, as the graph adds it before the head's ``Softmax``) as
    its attention mask."""
    for module in model.modules():
        if type(module).__name__ in SDPA_POOLING_HEADS:
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
            module.forward = _with_sdpa_bias(module.forward, host)


def _with_sdpa_bias(forward: Callable, host: BlockHost) -> Callable:
    def biased(*args, **kwargs):
        bias = host.attention_bias()
        if bias is None:
            return forward(*args, **kwargs)
        sdpa = F.scaled_dot_product_attention

        def biased_sdpa(q, k, v, **kw):  # keys in front of the tokens (a class token) get none
            return sdpa(q, k, v, **{**kw, "attn_mask": F.pad(bias, (k.shape[-2] - bias.shape[-1], 0))})

        F.scaled_dot_product_attention = biased_sdpa
        try:
            return forward(*args, **kwargs)
        finally:
            F.scaled_dot_product_attention = sdpa

    return biased


def wrap_blocks(model: nn.Module, host: BlockHost) -> int:
    """Replace, in place, every block of ``model`` by a :class:`ReducingBlock` driven by ``host``; returns depth."""
    container, blocks, spec = find_blocks(model)
    for index, block in enumerate(blocks):
        container[index] = ReducingBlock(block, spec, index, host)
    return len(blocks)
