"""Deterministic random weights with realistic statistics, for real architectures without a model hub.

Library initialisations (truncated normal std 0.02, LayerScale 1e-5, zero biases, unit norms) give near-uniform
attention and near-identity blocks: every token scores about 1/N, top-k selections then hinge on rounding noise,
and LayerScale bugs are invisible. :func:`randomize_weights` draws every parameter from a seeded generator instead:
matrices with fan-in scaling (attention logits of standard deviation about 1, so scores are spread out like in
trained models), norm weights around 1, small non-zero biases, LayerScale gammas in [0.1, 0.5], and token /
position embeddings of unit scale. The same seed gives the same weights on every machine with the same torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from tokensieve.errors import SourceError

_EMBEDDING_HINTS = (
    "cls_token",
    "reg_token",
    "register_tokens",
    "dist_token",
    "pos_embed",
    "position_embedding",
    "mask_token",
    "class_embedding",
    "probe",
)
_SCALE_HINTS = ("gamma", "layer_scale", "lambda1", "ls1", "ls2")


def _kind(name: str, param: torch.Tensor) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if any(h in name for h in _EMBEDDING_HINTS):
        return "embedding"
    if any(h in name for h in _SCALE_HINTS):
        return "layer_scale"
    if param.ndim >= 2:
        return "matrix"
    if leaf == "bias" or leaf.endswith("_bias"):
        return "bias"
    return "norm"


@torch.no_grad()
def randomize_weights(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every floating-point parameter of ``module`` in place, deterministically from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if not param.is_floating_point():
            continue
        shape = param.shape
        kind = _kind(name, param)
        if kind == "matrix":
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        elif kind == "embedding":
            value = torch.randn(shape, generator=generator)
        elif kind == "layer_scale":
            value = 0.1 + 0.4 * torch.rand(shape, generator=generator)
        elif kind == "bias":
            value = 0.02 * torch.randn(shape, generator=generator)
        else:
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        param.copy_(value.to(param.dtype))
    return module


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def pretrained_or_random(cls, config, directory: Path | None, seed: int) -> nn.Module:
    """A transformers model of class ``cls``: loaded in float32 from ``directory`` when that is a checkpoint
    directory holding weights, else built from ``config`` with :func:`randomize_weights` (presets and config-only
    directories); a checkpoint that does not load is a :class:`SourceError`."""
    if directory is not None and any((directory / f).exists() for f in WEIGHT_FILES):
        try:
            return cls.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as e:
            raise SourceError(f"cannot load the checkpoint in {str(directory)!r}: {str(e).splitlines()[0]}") from None
    return randomize_weights(cls(config), seed)
