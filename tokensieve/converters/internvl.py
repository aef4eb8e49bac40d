"""InternVL (InternVL3: ``InternVLForConditionalGeneration``, model type ``internvl``) as an MLLM family.

The vision tower is InternViT (a ViT with a CLS token and LayerScale); the vision graph runs it on each 448-pixel
tile (``[P, 3, S, S]``, P symbolic: the tiles of the image's grid, then a thumbnail when there is more than one
tile), takes the selected layer, drops CLS, folds each 2x2 block of patch tokens into one token (``pixel_shuffle``
with ``downsample_ratio`` 0.5: 256 tokens per 448-pixel tile) and projects them with the MLP projector ->
``[P, n, D]``. The language model is Qwen2 (q/k/v biases, grouped KV heads, tied embeddings), run by the shared
cache graphs of :mod:`tokensieve.converters.llava`.

In the prompt one image is one contiguous run: ``<img>``, ``<IMG_CONTEXT>`` x (n per tile x tiles), ``</img>``;
the chat template is Qwen2's ChatML. Presets: ``hf:internvl3-tiny`` (random, tiny widths, 64-pixel tiles of 8-pixel
patches: 16 tokens per tile) and ``hf:internvl3-2b-shapes`` (InternVL3-2B's widths: InternViT-300M and
Qwen2.5-1.5B, with 2 vision and 2 text layers, for ``plan`` and ``bench``); checkpoints through ``hf:PATH``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokensieve.converters.family import MllmFamily
from tokensieve.converters.llava import TINY_TEXT, byte_tokenizer
from tokensieve.errors import SourceError

TEMPLATE = "<|im_start|>user\n<IMG_CONTEXT>\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
SPECIAL_TOKENS = (
    *("<unk>", "<|endoftext|>", "<|im_end|>", "<pad>", "<|im_start|>"),
    *("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
)
NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # InternVL's published image_mean / image_std

_TINY_TEXT = {**TINY_TEXT, "vocab_size": len(SPECIAL_TOKENS) + 256, "tie_word_embeddings": True}
INTERNVL_PRESETS: dict[str, dict[str, Any]] = {
    "internvl3-tiny": {
        "capacity": 512,
        "processor": {"max_patches": 4},
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
            "attention_bias": True,
        },
        "text": _TINY_TEXT,
    },
    "internvl3-2b-shapes": {  # OpenGVLab/InternVL3-2B-hf's widths, 2 layers each
        "capacity": 4096,
        "processor": {"max_patches": 12},
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 2,
            "num_attention_heads": 16,
            "image_size": 448,
            "patch_size": 14,
            "attention_bias": True,
        },
        "text": {
            "vocab_size": 151674,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 2,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_theta": 1000000.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "tie_word_embeddings": True,
        },
    },
}


def preset_config(preset: dict[str, Any]):
    """The transformers config of an InternVL preset."""
    import transformers

    text = transformers.Qwen2Config(**preset["text"])
    vision = transformers.InternVLVisionConfig(**preset["vision"])
    context = SPECIAL_TOKENS.index("<IMG_CONTEXT>") if preset["text"]["vocab_size"] < 1000 else 151667
    return transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=context)


def _side(value: Any) -> int:
    """A config's image / patch size (an int or a square ``[h, w]``)."""
    sides = list(value) if isinstance(value, list | tuple) else [value, value]
    if sides[0] != sides[1]:
        raise SourceError(f"InternVL: non-square tiles or patches ({sides}) are not supported")
    return int(sides[0])


def tile_tokens(config) -> int:
    """Image tokens per tile: the patch grid after dropping CLS, pixel-shuffled by ``downsample_ratio``."""
    side = _side(config.vision_config.image_size) // _side(config.vision_config.patch_size)
    return int(side * config.downsample_ratio) ** 2


def host(config, processor: dict[str, Any]) -> dict[str, Any]:
    """Preprocessing and prompt facts (``runtimes/internvl_image.py``) from the config and the processor config;
    tiling is always on (the InternVL processor asks its image processor for ``crop_to_patches``)."""
    size = processor.get("size") or {}
    side = int(size.get("height", _side(config.vision_config.image_size)))
    return {
        "kind": config.model_type,
        "image_size": side,
        "patch_size": _side(config.vision_config.patch_size),
        "mean": list(processor.get("image_mean", IMAGENET[0])),
        "std": list(processor.get("image_std", IMAGENET[1])),
        "min_tiles": int(processor.get("min_patches", 1)),
        "max_tiles": int(processor.get("max_patches", 12)),
        "tile_tokens": tile_tokens(config),
        "image_token_id": int(config.image_token_id),
        "placeholder": NAMED_TOKENS["context_image_token"],
        "image_wrap": [NAMED_TOKENS["start_image_token"], NAMED_TOKENS["end_image_token"]],
        "select_strategy": config.vision_feature_select_strategy,
        "template": TEMPLATE,
        "bos_id": config.text_config.bos_token_id,
        "eos_id": config.text_config.eos_token_id,
    }


class TileFeatures(nn.Module):
    """``pixel_values [P, 3, S, S] -> [P, n, D]``: InternViT's selected layer, CLS dropped ("default" strategy),
    pixel-shuffled and projected, with the model's own modules (``get_image_features``'s steps)."""

    def __init__(self, model: nn.Module, cls_scores: bool = False):
        super().__init__()
        if cls_scores:
            raise SourceError("InternVL's vision graph has no cls_scores output (its tokens are pixel-shuffled)")
        self.inner = model.model
        config = model.config
        self.layer, self.ratio = config.vision_feature_layer, config.downsample_ratio
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.side = _side(config.vision_config.image_size) // _side(config.vision_config.patch_size)
        if not isinstance(self.layer, int):
            raise SourceError("several vision feature layers are not supported")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layer != -1
        out = self.inner.vision_tower(pixel_values=pixel_values, output_hidden_states=hidden_states)
        hidden = out.hidden_states[self.layer] if hidden_states else out.last_hidden_state
        hidden = hidden[:, 1:] if self.drop_cls else hidden
        side = self.side  # the patch grid's side
        grid = self.inner.pixel_shuffle(hidden.reshape(hidden.shape[0], side, side, -1), scale_factor=self.ratio)
        return self.inner.multi_modal_projector(grid.reshape(grid.shape[0], -1, grid.shape[-1]))


def tokenizer():
    """A byte-level tokenizer with ChatML's and InternVL's special tokens (presets; no hub)."""
    return byte_tokenizer(SPECIAL_TOKENS, **NAMED_TOKENS)


def hf_processor(host: dict[str, Any], tokenizer):
    """The Hugging Face processor an InternVL artifact is held to: ``InternVLProcessor`` with the PIL backend of
    its image processor (``GotOcr2ImageProcessorPil``)."""
    from transformers import InternVLProcessor, InternVLVideoProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    side = host["image_size"]
    images = GotOcr2ImageProcessorPil(
        size={"height": side, "width": side},
        image_mean=host["mean"],
        image_std=host["std"],
        min_patches=host["min_tiles"],
        max_patches=host["max_tiles"],
        crop_to_patches=True,
    )
    videos = InternVLVideoProcessor()  # the processor requires one; parity gives no video
    return InternVLProcessor(images, tokenizer, videos, image_seq_length=host["tile_tokens"])


def vision_geometry(config) -> dict[str, int]:
    """The sizes that set the vision graph's cost per tile: InternViT's layers run, widths, the pixel shuffle's
    merge (tokens folded into one) and the projector's output width."""
    vision = config.vision_config
    return {
        "layers": config.vision_feature_layer % (vision.num_hidden_layers + 1) or vision.num_hidden_layers,
        "hidden": vision.hidden_size,
        "intermediate": vision.intermediate_size,
        "channels": vision.num_channels,
        "patch_size": _side(vision.patch_size),
        "image_size": _side(vision.image_size),
        "projector": config.text_config.hidden_size,
        "merge": round(1 / config.downsample_ratio) ** 2,
    }


def image_tokens(host: dict[str, Any]) -> dict[str, Any]:
    """How many positions one image takes: tiles x tokens per tile (+ the ``<img>`` / ``</img>`` pair)."""
    rule = "tiles of the grid closest to the aspect ratio (+ thumbnail when more than one) x per_tile"
    return {"per_crop": host["tile_tokens"], "varies_with_image_size": True, "rule": rule}


INTERNVL = MllmFamily(
    kind="internvl",
    title="InternVL3",
    model_class="InternVLForConditionalGeneration",
    presets=INTERNVL_PRESETS,
    preset_config=preset_config,
    host=host,
    vision=TileFeatures,
    tokenizer=tokenizer,
    hf_processor=hf_processor,
    vision_geometry=vision_geometry,
    image_tokens=image_tokens,
    layout="tiles",
    tiled=True,
)
