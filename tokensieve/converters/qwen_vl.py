"""Qwen2-VL / Qwen2.5-VL configs: the presets, the host facts (processor, chat template, special tokens, mRoPE frame
spacing) and the vision tower's sizes, from a preset or a local Hugging Face checkpoint / config directory. The
family entries that export them are in :mod:`tokensieve.converters.qwen_family`.

The ``-shapes`` presets are the
published configurations of Qwen2.5-VL-3B-Instruct and Qwen2.5-VL-7B-Instruct at full depth, with the processor's
published ``min_pixels`` / ``max_pixels`` (planning needs no weights); the ``-tiny`` presets (tests) and
``qwen2.5-vl-small`` (benchmarks) get seeded random weights.

The vision geometry records what sets the tower's cost (:func:`tokensieve.runtimes.qwen_vision.tower_macs`): patch
embedding over ``channels x temporal x patch²`` pixels, ``layers`` blocks of width ``hidden`` (Qwen2.5-VL: a gated
MLP of ``intermediate``, window attention over ``window``-pixel squares except the ``full_layers`` blocks; Qwen2-VL:
a plain MLP, full attention everywhere), then the merger (``merge x merge`` patches -> one token of the language
model's width).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokensieve.converters.llava import OPENAI_CLIP, config_model_type
from tokensieve.errors import SourceError

QWEN_VL_TYPES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # the published preprocessor_config.json of Qwen2.5-VL
IMAGE_TOKEN = "<|image_pad|>"
PLACEHOLDER = f"<|vision_start|>{IMAGE_TOKEN}<|vision_end|>"  # where one image goes in a prompt
TEMPLATE = (  # Qwen2-VL / Qwen2.5-VL's chat template with the default system prompt, one image and one user turn
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    f"<|im_start|>user\n{PLACEHOLDER}{{prompt}}<|im_end|>\n<|im_start|>assistant\n"
)

_VISION_25 = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}
SPECIAL_TOKENS = (  # the presets' byte tokenizer: ChatML's and Qwen-VL's special tokens first
    *("<unk>", "<|endoftext|>", "<|im_end|>", "<pad>", "<|im_start|>"),
    *("<|vision_start|>", "<|vision_end|>", IMAGE_TOKEN, "<|video_pad|>"),
)
_PRESET_TOKENS = {
    "image_token_id": SPECIAL_TOKENS.index(IMAGE_TOKEN),
    "video_token_id": SPECIAL_TOKENS.index("<|video_pad|>"),
    "vision_start_token_id": SPECIAL_TOKENS.index("<|vision_start|>"),
    "vision_end_token_id": SPECIAL_TOKENS.index("<|vision_end|>"),
}
_TEXT_25 = {  # the presets' special-token ids are their byte tokenizer's
    "max_position_embeddings": 128000,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "bos_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
    "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
}
QWEN_VL_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-7b-shapes": {
        "plan_only": "Qwen2.5-VL-7B at full depth: about 33 GB of float32 weights",
        "tokens": _PRESET_TOKENS,
        "vision": {**_VISION_25, "out_hidden_size": 3584},
        "text": {
            **_TEXT_25,
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
        },
    },
    "qwen2.5-vl-3b-shapes": {
        "plan_only": "Qwen2.5-VL-3B at full depth: about 15 GB of float32 weights",
        "tokens": _PRESET_TOKENS,
        "vision": {**_VISION_25, "out_hidden_size": 2048},
        "text": {
            **_TEXT_25,
            "vocab_size": 151936,
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
    },
}
_TINY_TEXT = {  # mRoPE sections (t, h, w) of the 12-wide heads' 6 frequencies
    "vocab_size": len(SPECIAL_TOKENS) + 256,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "bos_token_id": SPECIAL_TOKENS.index("<|endoftext|>"),
    "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 2, 2]},
}
QWEN_VL_PRESETS["qwen2.5-vl-tiny"] = {  # windows of 2 x 2 merged tokens; block 1 attends over the image
    "model_type": "qwen2_5_vl",
    "vision": {**_VISION_25, "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
               "out_hidden_size": 48, "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2},
    "text": _TINY_TEXT,
    "tokens": _PRESET_TOKENS,
    "processor": {"min_pixels": 16 * 28 * 28, "max_pixels": 64 * 28 * 28},
    "capacity": 512,
}  # fmt: skip
for _size in ("3b", "7b"):  # benchmarks: the published widths with 2 vision blocks (one windowed) and 2 text layers
    _shapes = QWEN_VL_PRESETS[f"qwen2.5-vl-{_size}-shapes"]
    QWEN_VL_PRESETS[f"qwen2.5-vl-{_size}-bench"] = {
        "tokens": _PRESET_TOKENS,
        "vision": {**_shapes["vision"], "depth": 2, "fullatt_block_indexes": [1]},
        "text": {**_shapes["text"], "num_hidden_layers": 2},
        "capacity": 2048,
    }
QWEN_VL_PRESETS["qwen2.5-vl-small"] = {  # benchmarks: Qwen2.5-VL's windows (4 x 4 merged tokens), narrow widths
    "model_type": "qwen2_5_vl",
    "vision": {**_VISION_25, "depth": 8, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4,
               "out_hidden_size": 256, "fullatt_block_indexes": [3, 7]},
    "text": {**_TINY_TEXT, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 4,
             "rope_parameters": {**_TINY_TEXT["rope_parameters"], "mrope_section": [4, 6, 6]}},
    "tokens": _PRESET_TOKENS,
    "processor": {"min_pixels": 64 * 28 * 28, "max_pixels": 256 * 28 * 28},  # 256 to 1024 patches
}  # fmt: skip
QWEN_VL_PRESETS["qwen2-vl-tiny"] = {
    **QWEN_VL_PRESETS["qwen2.5-vl-tiny"],
    "model_type": "qwen2_vl",
    "vision": {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "hidden_size": 48},
}


def is_qwen_vl_source(name: str) -> bool:
    """A Qwen-VL preset, or a checkpoint / config directory whose ``model_type`` is a Qwen-VL family."""
    return name in QWEN_VL_PRESETS or config_model_type(name) in QWEN_VL_TYPES


def preset_config(preset: dict[str, Any]):
    """The transformers config of a Qwen-VL preset."""
    import transformers

    family = QWEN_VL_TYPES[preset.get("model_type", "qwen2_5_vl")].removesuffix("ForConditionalGeneration")
    return getattr(transformers, f"{family}Config")(
        vision_config=preset["vision"], text_config=preset["text"], **preset.get("tokens", {})
    )


def qwen_vl_config(name: str):
    """``(config, processor config)`` of a preset or a local directory, without building the model."""
    import transformers

    if name in QWEN_VL_PRESETS:
        preset = QWEN_VL_PRESETS[name]
        return preset_config(preset), preset.get("processor", {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})
    path = Path(name)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read a Hugging Face config from {name!r}: {e}") from None
    processor_file = path / "preprocessor_config.json"
    return config, json.loads(processor_file.read_text()) if processor_file.is_file() else {}


def host_config(config, processor: dict[str, Any]) -> dict[str, Any]:
    """The processor and prompt facts (``runtimes/qwen_image.py``, the MLLM runtime). The processor config gives
    the pixel bounds as ``min_pixels`` / ``max_pixels`` or as ``size = {shortest_edge, longest_edge}``;
    ``image_size`` is a typical image side (the geometric mean of the bounds' sides), what parity's random images
    are scaled from."""
    vision = config.vision_config
    size = processor.get("size") or {}
    low = int(processor.get("min_pixels") or size.get("shortest_edge") or MIN_PIXELS)
    high = int(processor.get("max_pixels") or size.get("longest_edge") or MAX_PIXELS)
    return {
        "kind": config.model_type,
        "patch_size": int(processor.get("patch_size", vision.patch_size)),
        "merge_size": int(processor.get("merge_size", vision.spatial_merge_size)),
        "temporal_patch_size": int(processor.get("temporal_patch_size", vision.temporal_patch_size)),
        "window_size": int(getattr(vision, "window_size", 0) or 0),  # 0: no window attention (Qwen2-VL)
        "min_pixels": low,
        "max_pixels": high,
        "image_size": round((low * high) ** 0.25),
        "mean": list(processor.get("image_mean", OPENAI_CLIP[0])),
        "std": list(processor.get("image_std", OPENAI_CLIP[1])),
        "image_token": IMAGE_TOKEN,
        "image_token_id": int(config.image_token_id),
        "video_token_id": int(config.video_token_id),
        "tokens_per_second": getattr(vision, "tokens_per_second", None),  # Qwen2.5-VL spaces video frames by it
        "placeholder": PLACEHOLDER,
        "template": TEMPLATE,
        "select_strategy": "full",  # every merged token is a feature (no CLS)
        "bos_id": config.text_config.bos_token_id,
        "eos_id": config.text_config.eos_token_id,
    }


def vision_geometry(config) -> dict[str, int]:
    """The sizes that set the vision tower's cost (see the module docstring)."""
    vision = config.vision_config
    windowed = config.model_type == "qwen2_5_vl"
    hidden = vision.hidden_size if windowed else vision.embed_dim
    return {
        "layers": vision.depth,
        "hidden": hidden,
        "intermediate": vision.intermediate_size if windowed else hidden * vision.mlp_ratio,
        "gated": int(windowed),
        "channels": vision.in_channels,
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
        "window": vision.window_size if windowed else 0,
        "full_layers": len(vision.fullatt_block_indexes) if windowed else vision.depth,
        "projector": vision.out_hidden_size if windowed else vision.hidden_size,
    }
