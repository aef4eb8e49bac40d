"""How eager references reach into the blocks of each supported model family, without re-implementing them.

A :class:`BlockSpec` names a block's submodules (pre-attention norm, attention, LayerScale, pre-MLP norm, MLP)
and the two attention submodules whose outputs are the queries and keys. A reference method wraps each block in
:class:`ReducingBlock`, which calls the block's *own* submodules for the attention half, hands the post-attention
stream plus Q/K to the method's site function, then runs the block's own MLP half on the reduced stream. So the
eager reference computes exactly the original model wherever no reduction happens (checked by a test with
``keep=1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tokensieve.errors import SourceError


@dataclass(frozen=True)
class BlockSpec:
    norm1: str
    attn: str
    ls1: str | None
    norm2: str
    mlp: str
    ls2: str | None
    query: str  # attention submodule whose output is the queries
    key: str
    heads_first: bool  # True: query/key outputs are [B, H, N, d] (timm q_norm/k_norm); False: [B, N, H*d]
    attn_returns_tuple: bool


_TIMM = BlockSpec("norm1", "attn", "ls1", "norm2", "mlp", "ls2", "q_norm", "k_norm", True, False)
_HF_VIT = BlockSpec(
    "layernorm_before", "attention", None, "layernorm_after", "mlp", None, "q_proj", "k_proj", False, True
)
_HF_DINOV2 = BlockSpec(
    "norm1", "attention", "layer_scale1", "norm2", "mlp", "layer_scale2", "q_proj", "k_proj", False, True
)
_HF_CLIP = BlockSpec("layer_norm1", "self_attn", None, "layer_norm2", "mlp", None, "q_proj", "k_proj", False, True)

BLOCK_SPECS: dict[str, BlockSpec] = {
    "Block": _TIMM,  # timm.models.vision_transformer.Block (ViT, DeiT, DeiT-III, DINOv2 in timm, ...)
    "ViTLayer": _HF_VIT,
    "Dinov2Layer": _HF_DINOV2,
    "Dinov2WithRegistersLayer": _HF_DINOV2,
    "CLIPEncoderLayer": _HF_CLIP,
    "SiglipEncoderLayer": _HF_CLIP,
}


def find_blocks(model: nn.Module) -> tuple[nn.Module, list[nn.Module], BlockSpec]:
    """The container (ModuleList/Sequential) holding the model's transformer blocks, the blocks, and their spec."""
    best: tuple[nn.Module, list[nn.Module], BlockSpec] | None = None
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        children = list(module)
        names = {type(c).__name__ for c in children}
        if len(names) == 1 and (name := names.pop()) in BLOCK_SPECS and (best is None or len(children) > len(best[1])):
            best = (module, children, BLOCK_SPECS[name])
    if best is None:
        raise SourceError(
            f"{type(model).__name__}: no supported transformer blocks found; supported block classes: "
            f"{', '.join(sorted(BLOCK_SPECS))}"
        )
    return best


def special_tokens(model: nn.Module) -> int:
    """Leading special tokens (CLS, distillation, registers) of the model's token sequence."""
    if hasattr(model, "num_prefix_tokens"):  # timm
        return int(model.num_prefix_tokens)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ("vit", "dinov2", "clip_vision_model", "clip"):
        return 1
    if model_type == "dinov2_with_registers":
        return 1 + int(config.num_register_tokens)
    if model_type in ("siglip_vision_model", "siglip"):
        return 0
    raise SourceError(f"{type(model).__name__}: unknown number of special tokens; pass specials=...")


@dataclass
class AttentionTensors:
    """Per-head queries and keys ``[B, H, N, d]`` of one block, with the attention's softmax scale."""

    query: torch.Tensor
    key: torch.Tensor
    scale: float


SiteFn = Callable[[torch.Tensor, AttentionTensors], torch.Tensor]


class ReducingBlock(nn.Module):
    """Runs ``block``'s attention half, applies ``site`` to the stream, then the block's MLP half."""

    def __init__(self, block: nn.Module, spec: BlockSpec, site: SiteFn):
        super().__init__()
        self.block, self.spec, self.site = block, spec, site

    def _part(self, name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return (lambda t: t) if name is None else getattr(self.block, name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        mask = args[0] if args else kwargs.get("attention_mask")
        if mask is not None:
            raise ValueError("token reduction references do not support attention masks")
        spec, attn = self.spec, getattr(self.block, self.spec.attn)
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            getattr(attn, spec.query).register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
            getattr(attn, spec.key).register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
        ]
        try:
            out = attn(getattr(self.block, spec.norm1)(x))
        finally:
            for hook in hooks:
                hook.remove()
        if spec.attn_returns_tuple:
            out = out[0]
        h = x + self._part(spec.ls1)(out)
        h = self.site(h, self._attention_tensors(attn, captured["q"], captured["k"]))
        return h + self._part(spec.ls2)(getattr(self.block, spec.mlp)(getattr(self.block, spec.norm2)(h)))

    def _attention_tensors(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> AttentionTensors:
        if self.spec.heads_first:
            return AttentionTensors(q, k, float(attn.scale))
        head_dim = int(attn.head_dim)
        b, n, _ = q.shape
        q = q.view(b, n, -1, head_dim).transpose(1, 2)
        k = k.view(b, n, -1, head_dim).transpose(1, 2)
        scale = getattr(attn, "scaling", getattr(attn, "scale", head_dim**-0.5))
        return AttentionTensors(q, k, float(scale))


def wrap_blocks(model: nn.Module, sites: dict[int, SiteFn]) -> None:
    """Replace, in place, each block ``i`` in ``sites`` by a :class:`ReducingBlock` running ``sites[i]``."""
    container, blocks, spec = find_blocks(model)
    for index, site in sites.items():
        if not 0 <= index < len(blocks):
            raise SourceError(f"block {index} out of range: the model has {len(blocks)} blocks")
        container[index] = ReducingBlock(blocks[index], spec, site)
