"""LLaVA / LLaVA-NeXT -> four ONNX graphs: vision, token embedding, decoder prefill, decoder decode step.

Sources: the presets ``hf:llava-tiny``, ``hf:llava-next-tiny`` (small random configs for demos and tests) and
``hf:llava-1.5-7b-shapes`` / ``hf:llava-next-7b-shapes`` (LLaVA-1.5-7B / LLaVA-NeXT-7B layer shapes, 2 vision and 2
text layers, for benchmarks), or a local Hugging Face checkpoint / config directory of
``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration``. Presets get a byte-level tokenizer built
in code (no hub).

Graphs (exported with the dynamo exporter, batch 1):

* ``vision``: ``pixel_values [P, 3, H, W]`` (P = 1 for LLaVA; thumbnail + crops for LLaVA-NeXT) ->
  ``image_features [P, n, D]``: the selected CLIP layer, CLS dropped ("default" strategy), projected (GlobalCom²
  artifacts also output ``cls_scores [P, n]``, see :class:`VisionFeatures`). LLaVA-NeXT's
  AnyRes packing (grid, unpadding, ``image_newline``) happens on the host from the image size, as the model does;
* ``embed``: ``input_ids [1, T]`` -> ``inputs_embeds [1, T, D]``;
* ``prefill``: ``inputs_embeds [1, T, D]``, ``position_ids [1, T]`` -> ``logits [1, V]`` (last position) and
  ``present_key_<i>``, ``present_value_<i> [1, H_kv, T, d]`` (after RoPE) per layer;
* ``decode`` (fixed capacity): ``input_ids [1, 1]``, ``position_ids [1, 1]``, ``cache_position [1]`` (the slot
  written) and ``cache_key_<i>``, ``cache_value_<i> [1, H_kv, C, d]`` -> ``logits [1, V]`` and the updated caches
  ``updated_key_<i>``, ``updated_value_<i>`` (same shapes). The new key/value is written in place with
  ``index_put`` (one ONNX ``ScatterND``, reduction none: TensorRT 10.3 parses it); attention masks the slots after
  ``cache_position``. Static shapes;
* ``decode_growing`` (option): ``past_key_<i>`` ``[1, H_kv, L, d]`` -> ``present_key_<i>`` ``[1, H_kv, L + 1, d]``.

The embed, prefill and decode graphs are shared by every MLLM family (InternVL's too); the LLaVA and LLaVA-NeXT
entries of the family table (:data:`LLAVA`, :data:`LLAVA_NEXT`, found by :mod:`tokensieve.converters.families`)
declare the rest. The decoder layers are the model's own (``LlamaDecoderLayer``, ``Qwen2DecoderLayer`` etc.); only
the cache is ours: a duck-typed object with the ``update`` method transformers' attention calls. A checkpoint's
language model is accepted when running its layers alone reproduces its forward (checked at load).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokensieve.converters.family import MllmFamily
from tokensieve.errors import SourceError

TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

_TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 112,
    "patch_size": 14,
    "projection_dim": 64,
}
TINY_TEXT = {  # the tiny presets' Llama-style decoder (other families' tiny presets start from it)
    "vocab_size": 261,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
LLAVA_PRESETS: dict[str, dict[str, Any]] = {
    "llava-tiny": {"kind": "llava", "vision": _TINY_VISION, "text": TINY_TEXT, "capacity": 512},
    "llava-next-tiny": {
        "kind": "llava_next",
        "vision": _TINY_VISION,
        "text": TINY_TEXT,
        "capacity": 1024,
        "image_grid_pinpoints": [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]],
    },
    "llava-1.5-7b-shapes": {
        "kind": "llava",
        "capacity": 1024,
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 2,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
        },
        "text": {
            "vocab_size": 32064,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 2,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 3,
        },
    },
}
LLAVA_PRESETS["llava-next-7b-shapes"] = {
    **LLAVA_PRESETS["llava-1.5-7b-shapes"],
    "kind": "llava_next",
    "capacity": 4096,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
}


def config_model_type(name: str) -> str | None:
    """The ``model_type`` of a checkpoint / config directory or ``config.json`` path (``None``: not readable)."""
    path = Path(name)
    config = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def byte_tokenizer(special: tuple[str, ...] = SPECIAL_TOKENS, **named: str):
    """A byte-level BPE tokenizer with ``special`` tokens first (LLaVA's by default), for random presets (no hub);
    ``named`` are extra named special tokens (``start_image_token="<img>"``), as a processor reads them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(special)}
    vocab |= {char: len(special) + i for i, char in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=special[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in special])
    roles = {"unk_token": special[0], "bos_token": special[1], "eos_token": special[2], "pad_token": special[3]}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles, extra_special_tokens=named or None)


@dataclass
class BuiltLlava:
    """An eager MLLM with what the host needs to run its graphs."""

    model: nn.Module
    kind: str  # the family's model_type ("llava", "llava_next", "internvl")
    tokenizer: Any
    host: dict[str, Any] = field(default_factory=dict)  # preprocessing and prompt facts for the runtime
    family: MllmFamily | None = None  # how its graphs and host facts are made


def _clip_host(config, processor: dict[str, Any]) -> dict[str, Any]:
    vision = config.vision_config
    size = processor.get("size", {})
    crop = processor.get("crop_size", {})
    return {
        "kind": config.model_type,
        "image_size": int(vision.image_size),
        "patch_size": int(vision.patch_size),
        "shortest_edge": int(size.get("shortest_edge", vision.image_size)),
        "crop": [int(crop.get("height", vision.image_size)), int(crop.get("width", vision.image_size))],
        "mean": list(processor.get("image_mean", OPENAI_CLIP[0])),
        "std": list(processor.get("image_std", OPENAI_CLIP[1])),
        "image_token_id": int(config.image_token_id),
        "select_strategy": config.vision_feature_select_strategy,
        "template": TEMPLATE,
        "bos_id": config.text_config.bos_token_id,
        "eos_id": config.text_config.eos_token_id,
    }


def llava_host(config, processor: dict[str, Any]) -> dict[str, Any]:
    """LLaVA's preprocessing and prompt facts, from the model config and the processor config."""
    return {**_clip_host(config, processor), "do_pad": bool(processor.get("do_pad", False))}


def llava_next_host(config, processor: dict[str, Any]) -> dict[str, Any]:
    """LLaVA-NeXT's: LLaVA's plus the grid resolutions of its AnyRes crops (always padded)."""
    pinpoints = processor.get("image_grid_pinpoints", config.image_grid_pinpoints)
    return {**_clip_host(config, processor), "do_pad": True, "grid_pinpoints": [list(map(int, p)) for p in pinpoints]}


def llava_preset_config(preset: dict[str, Any]):
    """The transformers config of a LLaVA or LLaVA-NeXT preset."""
    import transformers

    common = {
        "vision_config": transformers.CLIPVisionConfig(**preset["vision"]),
        "text_config": transformers.LlamaConfig(**preset["text"]),
        "image_token_id": SPECIAL_TOKENS.index("<image>"),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }
    if preset["kind"] == "llava_next":
        return transformers.LlavaNextConfig(**common, image_grid_pinpoints=preset["image_grid_pinpoints"])
    return transformers.LlavaConfig(**common)


def llava_hf_processor(host: dict[str, Any], tokenizer):
    """The Hugging Face PIL processor a LLaVA / LLaVA-NeXT artifact is held to."""
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    common = {
        "size": {"shortest_edge": host["shortest_edge"]},
        "crop_size": {"height": host["crop"][0], "width": host["crop"][1]},
        "image_mean": host["mean"],
        "image_std": host["std"],
    }
    if "grid_pinpoints" in host:
        images = LlavaNextImageProcessorPil(image_grid_pinpoints=host["grid_pinpoints"], **common)
        cls = LlavaNextProcessor
    else:
        images, cls = LlavaImageProcessorPil(do_pad=host["do_pad"], **common), LlavaProcessor
    extra = 1 if host["select_strategy"] == "default" else 0  # the CLS token the "default" strategy drops
    return cls(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=host["patch_size"],
        vision_feature_select_strategy=host["select_strategy"],
        num_additional_image_tokens=extra,
    )


def llava_image_tokens(host: dict[str, Any]) -> dict[str, Any]:
    """How many sequence positions one LLaVA image takes (fixed)."""
    from tokensieve.runtimes.llava_image import crop_tokens

    return {"count": crop_tokens(host), "varies_with_image_size": False}


def llava_next_image_tokens(host: dict[str, Any]) -> dict[str, Any]:
    """LLaVA-NeXT: a function of the image size."""
    from tokensieve.runtimes.llava_image import crop_tokens

    rule = "thumbnail + unpadded grid + newline per row"
    return {"per_crop": crop_tokens(host), "varies_with_image_size": True, "rule": rule}


def check_supported(name: str, model: nn.Module, rope_rows: int = 1) -> None:
    """Refuse a checkpoint whose language model the cache graphs cannot run (any family)."""
    config = model.config
    text = config.text_config
    layer = getattr(config, "vision_feature_layer", -1)  # Qwen-VL's tower has no selectable layer
    if not isinstance(layer, int):
        raise SourceError(f"{name}: several vision feature layers ({layer}) are not supported")
    if getattr(text, "sliding_window", None):
        raise SourceError(f"{name}: sliding-window attention ({text.model_type}) is not supported by the cache graphs")
    lm = model.model.language_model
    if not all(hasattr(lm, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise SourceError(f"{name}: the language model {type(lm).__name__} is not a Llama-style decoder")
    _check_layers_are_the_forward(name, model, rope_rows)


def _check_layers_are_the_forward(name: str, model: nn.Module, rope_rows: int = 1) -> None:
    """The cache graphs run the language model's layers, final norm and head themselves (``_Decoder``). A model
    whose own forward does more (Granite scales the input embeddings, for one) would export graphs that silently
    disagree with it, so both are compared on a short random prompt and a mismatch is refused."""
    lm = model.model.language_model
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 8, model.config.text_config.hidden_size, generator=generator)
    embeds = embeds * lm.embed_tokens.weight.std()
    positions = torch.arange(8)[None]
    with torch.no_grad():
        try:
            expected = model.lm_head(lm(inputs_embeds=embeds, position_ids=positions).last_hidden_state[:, -1])
            actual = Prefill(model, rope_rows)(embeds, positions.expand(rope_rows, -1))[0]
        except RuntimeError as e:
            raise SourceError(f"{name}: {type(lm).__name__} fails a forward pass: {str(e).splitlines()[0]}") from None
    error = float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not error <= 1e-4:
        raise SourceError(
            f"{name}: {type(lm).__name__}'s forward does more than run its decoder layers (running the layers alone "
            f"changes the logits by {error:.1e} relative), which the cache graphs cannot reproduce; supported "
            "language models are decoders whose forward is embed -> layers -> norm (Llama, Mistral, Qwen2/3, Gemma, "
            "Phi-3, ...)"
        )


# -- export wrappers ---------------------------------------------------------------------------------------------


class VisionFeatures(nn.Module):
    """``pixel_values [P, 3, H, W] -> [P, n, D]``: the selected vision layer, CLS dropped, projected.

    With ``cls_scores`` it also returns ``[P, n]``: the last encoder layer's head-mean pre-softmax attention logits
    ``(q * scale) . k`` of the CLS row over the patch columns (GlobalCom²'s score). That layer reads
    ``hidden_states[-2]``; it is dead code for the features, so the score is exported here rather than located by a
    graph pass."""

    def __init__(self, model: nn.Module, cls_scores: bool = False):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        config = model.config
        self.layer = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.cls_scores = cls_scores
        if not isinstance(self.layer, int):
            raise SourceError("several vision feature layers are not supported")

    def forward(self, pixel_values: torch.Tensor):
        states = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        hidden = states[self.layer]
        features = self.projector(hidden[:, 1:] if self.drop_cls else hidden)
        if not self.cls_scores:
            return features
        return features, last_layer_cls_logits(self.vision_tower.encoder.layers[-1], states[-2])


def last_layer_cls_logits(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Head-mean pre-softmax logits ``[P, n]`` of the CLS query over the patch keys, for a CLIP encoder ``layer``
    whose input is ``hidden [P, 1 + n, C]``."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    heads, head_dim = attention.num_heads, attention.head_dim
    query = (attention.q_proj(normed[:, :1]) * attention.scale).reshape(-1, 1, heads, head_dim)
    key = attention.k_proj(normed[:, 1:]).reshape(hidden.shape[0], -1, heads, head_dim)
    return torch.einsum("pqhd,pnhd->phn", query, key).mean(1)


def last_layer_cls_probs(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Head-mean post-softmax attention ``[P, n]`` of the CLS query over the patch keys (the softmax over every key,
    CLS included), for a CLIP encoder ``layer`` whose input is ``hidden [P, 1 + n, C]`` (MustDrop's key-set score)."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    heads, head_dim = attention.num_heads, attention.head_dim
    query = (attention.q_proj(normed[:, :1]) * attention.scale).reshape(-1, 1, heads, head_dim)
    key = attention.k_proj(normed).reshape(hidden.shape[0], -1, heads, head_dim)
    probs = torch.einsum("pqhd,pnhd->phn", query, key).softmax(-1)
    return probs.mean(1)[:, 1:]


class VisionStem(nn.Module):
    """MustDrop's ``vision_0``: ``pixel_values [1, 3, H, W]`` -> CLIP layer 0's output ``[1, 1 + n, C]`` and, given
    ``windows`` (``[W, 9]`` patch indices), each window's mean pairwise cosine ``[W]`` (self pairs excluded)."""

    def __init__(self, model: nn.Module, windows: list[list[int]] | None):
        super().__init__()
        self.tower = model.model.vision_tower
        self.windows = None if windows is None else torch.tensor(windows)

    def forward(self, pixel_values: torch.Tensor):
        hidden = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))
        hidden = self.tower.encoder.layers[0](hidden, None)
        if self.windows is None:
            return hidden
        tokens = hidden[0, 1:][self.windows]  # [W, 9, C]
        unit = tokens / tokens.norm(dim=-1, keepdim=True)
        cosine = unit @ unit.transpose(1, 2)
        size = self.windows.shape[1]
        off_diagonal = cosine * (1 - torch.eye(size))
        return hidden, off_diagonal.sum((1, 2)) / (size * (size - 1))


class VisionTail(nn.Module):
    """MustDrop's ``vision_1``: CLIP layers 1.. on ``hidden_states [1, S, C]`` (S symbolic: CLS + the tokens left
    after the window merge) -> the projected features of the selected layer without CLS ``[1, S - 1, D]`` and the
    last layer's CLS attention on them ``[1, S - 1]`` (:func:`last_layer_cls_probs`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        layers = len(self.tower.encoder.layers)
        self.feature = model.config.vision_feature_layer % (layers + 1)  # index into [embeddings, layer 0, ...]
        if self.feature < 1:
            raise SourceError("mustdrop: the vision feature layer must come after CLIP layer 0 (it merges there)")

    def forward(self, hidden_states: torch.Tensor):
        layers = self.tower.encoder.layers
        states = {1: hidden_states}  # index k: the output of layer k - 1
        for index in range(1, max(self.feature, len(layers) - 1)):
            states[index + 1] = layers[index](states[index], None)
        features = self.projector(states[self.feature][:, 1:])
        return features, last_layer_cls_probs(layers[-1], states[len(layers) - 1])


class TokenEmbedding(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.embed = model.model.language_model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class _RecordingCache:
    """Prefill: the layers' keys/values (after RoPE) are collected and returned as graph outputs."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states


class _FixedCache(_RecordingCache):
    """Decode: write the new key/value at ``slot`` of fixed-capacity caches, in place.

    ``index_put`` with broadcast (batch, head, slot) indices exports to one ``ScatterND`` (reduction none) on the
    cache as it is: no transposes of the whole cache around the write (``index_copy`` on axis 2 adds two)."""

    def __init__(self, keys, values, slot: torch.Tensor):
        super().__init__()
        self.keys, self.values = dict(enumerate(keys)), dict(enumerate(values))
        heads = keys[0].shape[1]
        zero = torch.zeros(1, 1, 1, dtype=torch.long)
        self.index = [zero, torch.arange(heads).view(1, heads, 1), slot.view(1, 1, 1)]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx] = torch.ops.aten.index_put(self.keys[layer_idx], self.index, key_states)
        self.values[layer_idx] = torch.ops.aten.index_put(self.values[layer_idx], self.index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class _GrowingCache(_RecordingCache):
    def __init__(self, keys, values):
        super().__init__()
        self.past = (list(keys), list(values))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        key = torch.cat([self.past[0][layer_idx], key_states], dim=2)
        value = torch.cat([self.past[1][layer_idx], value_states], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


class _Decoder(nn.Module):
    """Runs the language model's own layers with a given cache object and additive mask. ``rope_rows`` > 1
    (mRoPE): prefill's ``position_ids [rows, T]`` go to the rotary embedding as ``[rows, 1, T]``; decode graphs take
    ``rope_delta [1]`` after the caches and rotate the new token at ``position_ids + rope_delta`` (the same on every
    row), ``position_ids`` staying the sequence index the cache logic reads."""

    def __init__(self, model: nn.Module, rope_rows: int = 1):
        super().__init__()
        lm = model.model.language_model
        self.embed, self.layers, self.norm, self.rotary = lm.embed_tokens, lm.layers, lm.norm, lm.rotary_emb
        self.lm_head = model.lm_head
        self.rope_rows = rope_rows

    def run(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache, mask: torch.Tensor | None) -> torch.Tensor:
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                position_embeddings=position_embeddings,
            )
        return self.lm_head(self.norm(hidden[:, -1]))


class Prefill(_Decoder):
    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
        cache = _RecordingCache()
        steps = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        future = steps[None, :] > steps[:, None]  # explicit causal mask: independent of the attention backend
        mask = torch.where(future, torch.finfo(torch.float32).min, 0.0)[None, None]
        rope = position_ids[:, None] if self.rope_rows > 1 else position_ids
        logits = self.run(inputs_embeds, rope, cache, mask)
        return (logits, *[t for i in range(len(self.layers)) for t in (cache.keys[i], cache.values[i])])


class DecodeFixed(_Decoder):
    def forward(self, input_ids, position_ids, cache_position, caches: tuple[torch.Tensor, ...], rope_delta=None):
        keys, values = caches[0::2], caches[1::2]
        cache = _FixedCache(keys, values, cache_position)
        capacity = keys[0].shape[2]
        visible = torch.arange(capacity, device=input_ids.device) <= cache_position
        mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None, None, :]
        rope = position_ids if rope_delta is None else position_ids + rope_delta
        logits = self.run(self.embed(input_ids), rope, cache, mask)
        return (logits, *[t for i in range(len(self.layers)) for t in (cache.keys[i], cache.values[i])])


class DecodeGrowing(_Decoder):
    def forward(self, input_ids, position_ids, past: tuple[torch.Tensor, ...], rope_delta=None):
        cache = _GrowingCache(past[0::2], past[1::2])
        rope = position_ids if rope_delta is None else position_ids + rope_delta
        logits = self.run(self.embed(input_ids), rope, cache, None)
        return (logits, *[t for i in range(len(self.layers)) for t in (cache.keys[i], cache.values[i])])


def cache_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the language model."""
    geometry = decoder_geometry(model.config.text_config)
    return geometry["layers"], geometry["kv_heads"], geometry["head_dim"]


def decoder_geometry(text) -> dict[str, int]:
    """The sizes of a language-model config that set its cost and cache (the manifest's ``decoder``)."""
    return {
        "layers": text.num_hidden_layers,
        "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "hidden": text.hidden_size,
        "intermediate": text.intermediate_size,
        "vocab": text.vocab_size,
    }


def vision_geometry(config) -> dict[str, int] | None:
    """The sizes that set the vision graph's cost (the manifest's ``vision``): the CLIP layers run up to the selected
    feature layer, the tower's widths, the projector's output width; ``None`` for other vision towers."""
    vision = config.vision_config
    if vision.model_type != "clip_vision_model" or not isinstance(config.vision_feature_layer, int):
        return None
    return {
        "layers": config.vision_feature_layer % (vision.num_hidden_layers + 1),
        "hidden": vision.hidden_size,
        "intermediate": vision.intermediate_size,
        "channels": vision.num_channels,
        "patch_size": vision.patch_size,
        "image_size": vision.image_size,
        "projector": config.text_config.hidden_size,
    }


def export_llava(
    built: BuiltLlava,
    capacity: int,
    opset: int = 18,
    growing: bool = True,
    cls_scores: bool = False,
    split_vision: bool = False,
    windows: list[list[int]] | None = None,
    buckets: Any = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The graphs of ``built`` as onnx-ir models (``vision``, ``embed``, ``prefill``, ``decode`` and optionally
    ``decode_growing``) and the seconds each export took; ``cls_scores`` adds that output to the vision graph.
    ``split_vision`` (MustDrop) exports ``vision_0`` / ``vision_1`` instead of ``vision`` (:class:`VisionStem` with
    the similarity of ``windows``, when given, and :class:`VisionTail`). A family with ``vision_graphs`` (Qwen-VL)
    exports its own vision graphs for ``buckets`` instead."""
    from tokensieve.converters.export import export_graph

    family = built.family
    jobs = {**_vision_jobs(built, cls_scores, split_vision, windows), **_decoder_jobs(built, capacity, growing)}
    graphs, seconds = {}, {}
    if family.vision_graphs is not None:
        start = time.perf_counter()
        graphs = family.vision_graphs(built.model, built.host, opset, buckets)
        seconds = dict.fromkeys(graphs, round((time.perf_counter() - start) / max(len(graphs), 1), 2))
    for key, (module, args, inputs, outputs, axes) in jobs.items():
        start = time.perf_counter()
        graphs[key] = export_graph(module, args, inputs, outputs, opset=opset, dynamic_axes=axes)
        seconds[key] = round(time.perf_counter() - start, 2)
    return graphs, seconds


def _vision_jobs(built: BuiltLlava, cls_scores: bool, split_vision: bool, windows) -> dict[str, tuple]:
    """The export jobs of the vision graph (MustDrop: its two halves); none for ``vision_graphs`` families."""
    model, family = built.model, built.family
    if family.vision_graphs is not None:
        return {}
    size = built.host["image_size"]
    pixels = (torch.randn(2 if family.tiled else 1, 3, size, size),)  # tiled: a variable number of tiles (crops)
    outputs = ["image_features", "cls_scores"] if cls_scores else ["image_features"]
    axes = {"pixel_values": {0: "patches"}} if family.tiled else None
    if not split_vision:
        return {"vision": (family.vision(model, cls_scores), pixels, ["pixel_values"], outputs, axes)}
    stem_outputs = ["hidden_states", "window_similarity"] if windows else ["hidden_states"]
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return {
        "vision_0": (VisionStem(model, windows), pixels, ["pixel_values"], stem_outputs, None),
        "vision_1": (
            VisionTail(model),
            (torch.randn(1, tokens, vision.hidden_size),),
            ["hidden_states"],
            ["image_features", "cls_attention"],
            {"hidden_states": {1: "vision_tokens"}},
        ),
    }


def _decoder_jobs(built: BuiltLlava, capacity: int, growing: bool) -> dict[str, tuple]:
    """The export jobs of the embed, prefill and decode graphs (see the module docstring)."""
    model, rows = built.model, built.family.rope_rows
    layers, kv_heads, head_dim = cache_geometry(model)
    hidden = model.config.text_config.hidden_size
    ids = torch.full((1, 8), built.host["image_token_id"] + 1, dtype=torch.long)
    step = (ids[:, :1], torch.tensor([[8]]))
    kv_names = [f"{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    delta = ((torch.tensor([3]),), ["rope_delta"]) if rows > 1 else ((), [])  # mRoPE: decode rotates at index + delta
    jobs: dict[str, tuple] = {
        "embed": (TokenEmbedding(model), (ids,), ["input_ids"], ["inputs_embeds"], {"input_ids": {1: "sequence"}}),
        "prefill": (
            Prefill(model, rows),
            (torch.randn(1, 8, hidden), torch.arange(8)[None].expand(rows, -1).contiguous()),
            ["inputs_embeds", "position_ids"],
            ["logits", *[f"present_{n}" for n in kv_names]],
            {"inputs_embeds": {1: "sequence"}, "position_ids": {1: "sequence"}},
        ),
        "decode": (
            DecodeFixed(model, rows),
            (*step, torch.tensor([8]), _caches(kv_heads, capacity, head_dim, len(kv_names)), *delta[0]),
            ["input_ids", "position_ids", "cache_position", *[f"cache_{n}" for n in kv_names], *delta[1]],
            ["logits", *[f"updated_{n}" for n in kv_names]],
            None,
        ),
    }
    if growing:
        jobs["decode_growing"] = (
            DecodeGrowing(model, rows),
            (*step, _caches(kv_heads, 8, head_dim, len(kv_names)), *delta[0]),
            ["input_ids", "position_ids", *[f"past_{n}" for n in kv_names], *delta[1]],
            ["logits", *[f"present_{n}" for n in kv_names]],
            {f"past_{n}": {2: "past"} for n in kv_names},
        )
    return jobs


def _caches(kv_heads: int, length: int, head_dim: int, count: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(1, kv_heads, length, head_dim) for _ in range(count))


def _family(kind: str, **facts: Any) -> MllmFamily:
    return MllmFamily(
        kind=kind,
        title={"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT"}[kind],
        model_class={"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}[kind],
        presets={name: preset for name, preset in LLAVA_PRESETS.items() if preset["kind"] == kind},
        preset_config=llava_preset_config,
        vision=VisionFeatures,
        tokenizer=byte_tokenizer,
        hf_processor=llava_hf_processor,
        vision_geometry=vision_geometry,
        **facts,
    )


LLAVA = _family("llava", host=llava_host, image_tokens=llava_image_tokens, layout="grid")
LLAVA_NEXT = _family(
    "llava_next", host=llava_next_host, image_tokens=llava_next_image_tokens, layout="anyres", tiled=True
)
