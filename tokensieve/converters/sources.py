"""Model sources: ``timm:NAME``, ``hf:PRESET`` / ``hf:PATH`` and existing ``.onnx`` files.

A :class:`SourceSpec` is what the manifest records, so that ``tokensieve parity`` can rebuild the exact eager
module later: random-weight models are rebuilt from the seed (and checked against the recorded weight hash), real
checkpoints are reloaded from their local path. There is no model hub on the machines tokensieve is tested on:
``timm`` models are created with ``pretrained=False`` and Hugging Face towers from a config (preset, ``config.json``
or a local checkpoint directory).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokensieve.converters.families import FAMILIES, PRESETS
from tokensieve.converters.init import pretrained_or_random, randomize_weights
from tokensieve.converters.qwen_vl import QWEN_VL_PRESETS
from tokensieve.errors import SourceError

# Hugging Face vision-tower presets: the library's default (base-size) config of each family.
HF_PRESETS: dict[str, str] = {
    "vit": "ViTConfig",
    "clip": "CLIPVisionConfig",
    "siglip": "SiglipVisionConfig",
    "dinov2": "Dinov2Config",
    "dinov2-registers": "Dinov2WithRegistersConfig",
    "deit": "DeiTConfig",
    "ijepa": "IJepaConfig",
    "dinov3": "DINOv3ViTConfig",
    "aimv2": "Aimv2VisionConfig",
    "beit": "BeitConfig",
    "data2vec-vision": "Data2VecVisionConfig",
}
# config.model_type -> vision model class
HF_MODELS = {
    "vit": "ViTModel",
    "clip_vision_model": "CLIPVisionModel",
    "clip": "CLIPVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "siglip": "SiglipVisionModel",
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "deit": "DeiTModel",
    "ijepa": "IJepaModel",
    "dinov3_vit": "DINOv3ViTModel",
    "aimv2_vision_model": "Aimv2VisionModel",
    "beit": "BeitModel",
    "data2vec-vision": "Data2VecVisionModel",
    "dpt": "DPTForDepthEstimation",  # a dense head: DPT's neck and depth head on a backbone's intermediate taps
}
# config.model_type -> the outputs its model class is exported with (default: last_hidden_state, pooler_output)
HF_OUTPUTS = {"dpt": ("predicted_depth",)}
# Hugging Face vision towers known and refused: model type -> why, and what to use instead
_NAFLEX = (
    "SigLIP2 (NaFlex) takes variable-length patch sequences with a pixel attention mask and per-image spatial shapes, "
    "not a fixed-size image, and resizes its position embedding to each image's grid; tokensieve exports fixed-shape "
    "image towers. Use hf:siglip (fixed resolution) or timm's NaFlexViT (e.g. timm:naflexvit_base_patch16_siglip)"
)
HF_REFUSED = {"siglip2_vision_model": _NAFLEX, "siglip2": _NAFLEX}


@dataclass(frozen=True)
class SourceSpec:
    """Where a model comes from. ``kind`` is ``timm``, ``hf`` or ``onnx``."""

    kind: str
    name: str
    weights: str | None = None
    seed: int = 0
    img_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # timm create_model keyword arguments

    @property
    def text(self) -> str:
        if self.kind == "onnx":
            return self.name
        query = "&".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{self.name}" + (f"?{query}" if query else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceSpec:
        return cls(**data)


def _timm_options(query: str) -> dict[str, Any]:
    """``global_pool=avg&class_token=false`` -> keyword arguments for ``timm.create_model`` (literals only)."""
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise SourceError(f"bad timm option {item!r}; use timm:NAME?key=value&key=value")
        lowered = raw.lower()
        if lowered in ("true", "false", "none"):
            options[key] = {"true": True, "false": False, "none": None}[lowered]
        else:
            try:
                options[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                options[key] = raw
    return options


def parse_source(
    text: str | os.PathLike, weights: str | None = None, seed: int = 0, img_size: int | None = None
) -> SourceSpec:
    """``timm:vit_base_patch16_224[?key=value&...]``, ``hf:clip``, ``hf:/path/to/checkpoint_or_config``,
    ``model.onnx`` (a path object too)."""
    text = os.fspath(text).strip()
    if weights is not None:
        weights = os.path.abspath(weights)
        if not os.path.isfile(weights):
            raise SourceError(f"weights file {weights!r} does not exist")
    if text.startswith("timm:"):
        name, _, query = text[5:].partition("?")
        options = _timm_options(query)
        if "img_size" in options:  # ?img_size=N is the --img-size of the source text
            given = options.pop("img_size")
            if img_size is not None and img_size != given:
                raise SourceError(f"{text}: img_size={given} in the source and --img-size {img_size} disagree")
            img_size = given
        return SourceSpec("timm", name, weights, seed, img_size, options)
    if text.startswith("hf:"):
        name = text[3:]
        presets = [*HF_PRESETS, *PRESETS, *QWEN_VL_PRESETS]
        if name not in presets:
            if not os.path.exists(name):
                raise SourceError(
                    f"hf source {name!r} is neither a preset ({', '.join(presets)}) nor an "
                    "existing local checkpoint directory or config.json (there is no model hub here)"
                )
            name = os.path.abspath(name)
        if weights is not None:
            raise SourceError("--weights is for timm checkpoints; put Hugging Face weights in the checkpoint directory")
        return SourceSpec("hf", name, None, seed, img_size)
    if text.endswith(".onnx"):
        if not os.path.isfile(text):
            raise SourceError(f"ONNX file {text!r} does not exist")
        return SourceSpec("onnx", os.path.abspath(text), img_size=img_size)
    raise SourceError(
        f"unknown model source {text!r}; use timm:NAME (e.g. timm:vit_base_patch16_224), hf:PRESET or hf:PATH, "
        "or a path to an .onnx file"
    )


class HFVisionTower(nn.Module):
    """A Hugging Face vision model as ``pixel_values -> (last_hidden_state, pooler_output)``, or the outputs
    :data:`HF_OUTPUTS` names for its model type (DPT: ``predicted_depth``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        pooled = getattr(model, "pooler", True) is not None  # I-JEPA: no pooling layer, no pooler_output
        default = ("last_hidden_state", "pooler_output") if pooled else ("last_hidden_state",)
        self.output_names = HF_OUTPUTS.get(model.config.model_type, default)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values)
        return tuple(getattr(out, name) for name in self.output_names)


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HF_NORMALIZATION = {
    "clip_vision_model": CLIP,
    "clip": CLIP,
    "aimv2_vision_model": CLIP,
    "dinov2": IMAGENET,
    "dinov2_with_registers": IMAGENET,
    "dinov3_vit": IMAGENET,
    "deit": IMAGENET,
}


@dataclass
class BuiltModel:
    """An eager module ready to export, with its input geometry, output names and input normalisation."""

    module: nn.Module
    input_shape: tuple[int, int, int]  # C, H, W
    output_names: tuple[str, ...]
    mean: tuple[float, ...] = HALF[0]
    std: tuple[float, ...] = HALF[1]


def _build_timm(spec: SourceSpec) -> BuiltModel:
    import timm

    kwargs = {**spec.options, **({"img_size": spec.img_size} if spec.img_size else {})}
    try:
        module = timm.create_model(spec.name, pretrained=False, **kwargs)
    except TypeError as e:
        raise SourceError(f"timm:{spec.name} does not accept these options {spec.options}: {e}") from None
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise SourceError(f"timm:{spec.name}: {e}") from None
        close = timm.list_models(f"*{spec.name.split('_')[0]}*")[:8]
        raise SourceError(f"unknown timm model {spec.name!r}; similar names: {', '.join(close) or 'none'}") from None
    if spec.weights:
        try:
            timm.models.load_checkpoint(module, spec.weights, strict=True)
        except Exception as e:  # torch/safetensors raise many types for a bad file
            raise SourceError(f"cannot load weights {spec.weights!r} into timm:{spec.name}: {e}") from None
    else:
        randomize_weights(module, spec.seed)
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if spec.img_size:
        h = w = spec.img_size
    mean, std = tuple(cfg.get("mean", HALF[0])), tuple(cfg.get("std", HALF[1]))
    names = ("logits",)
    if spec.options.get("features_only"):  # forward_intermediates: one feature map per out_indices entry
        names = tuple(f"features_{i}" for i in range(len(module.feature_info.channels())))
    return BuiltModel(module.eval(), (int(c), int(h), int(w)), names, mean, std)


def _hf_config(spec: SourceSpec):
    import transformers

    if spec.name in HF_PRESETS:
        config = getattr(transformers, HF_PRESETS[spec.name])()
    else:
        path = Path(spec.name)
        try:
            if path.is_file():
                data = json.loads(path.read_text())
                config = transformers.AutoConfig.for_model(**data)
            else:
                config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise SourceError(f"cannot read a Hugging Face config from {spec.name!r}: {e}") from None
    if config.model_type in ("clip", "siglip"):
        config = config.vision_config
    if spec.img_size:
        config.image_size = spec.img_size
    return config


def _build_hf(spec: SourceSpec) -> BuiltModel:
    import transformers

    config = _hf_config(spec)
    if config.model_type in HF_REFUSED:
        raise SourceError(
            f"Hugging Face model type {config.model_type!r} is not supported: {HF_REFUSED[config.model_type]}"
        )
    class_name = HF_MODELS.get(config.model_type)
    if class_name is None:
        raise SourceError(
            f"Hugging Face model type {config.model_type!r} is not supported; vision towers: "
            f"{', '.join(sorted(set(HF_MODELS)))}; MLLMs: {', '.join(FAMILIES)}"
        )
    cls = getattr(transformers, class_name)
    model = pretrained_or_random(cls, config, Path(spec.name), spec.seed)
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    mean, std = HF_NORMALIZATION.get(config.model_type, HALF)
    shape = (int(config.num_channels), int(h), int(w))
    tower = HFVisionTower(model).eval()
    return BuiltModel(tower, shape, tower.output_names, mean, std)


def build_module(spec: SourceSpec) -> BuiltModel:
    """The eager module of a timm or Hugging Face source (``onnx`` sources have none)."""
    if spec.kind == "timm":
        return _build_timm(spec)
    if spec.kind == "hf":
        return _build_hf(spec)
    raise SourceError(f"{spec.text} is an ONNX file; it has no eager PyTorch module")


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of the module's state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
