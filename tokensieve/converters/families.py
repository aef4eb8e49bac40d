"""The table of MLLM families the converter exports, and the generic steps that use it: a source name (a preset or
a local checkpoint / config directory) -> its family, config, eager model and host facts.

A family is declared once (:class:`tokensieve.converters.family.MllmFamily`): LLaVA and LLaVA-NeXT in
:mod:`tokensieve.converters.llava`, InternVL in :mod:`tokensieve.converters.internvl`, Qwen2-VL and Qwen2.5-VL in
:mod:`tokensieve.converters.qwen_family`. Adding one is adding an
entry here (plus its host-side entry in :mod:`tokensieve.runtimes.image_families`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokensieve.converters.family import MllmFamily
from tokensieve.converters.init import pretrained_or_random
from tokensieve.converters.internvl import INTERNVL
from tokensieve.converters.llava import LLAVA, LLAVA_NEXT, BuiltLlava, check_supported, config_model_type
from tokensieve.converters.qwen_family import QWEN2_5_VL, QWEN2_VL
from tokensieve.errors import SourceError

FAMILIES: dict[str, MllmFamily] = {f.kind: f for f in (LLAVA, LLAVA_NEXT, INTERNVL, QWEN2_5_VL, QWEN2_VL)}
PRESETS: dict[str, MllmFamily] = {name: family for family in FAMILIES.values() for name in family.presets}


def supported() -> str:
    """The families and presets, for error messages."""
    *first, last = [family.title for family in FAMILIES.values()]
    presets = ", ".join(f"hf:{name}" for name in PRESETS)
    return f"{', '.join(first)} and {last} (model types {', '.join(FAMILIES)}; presets {presets})"


def is_mllm_source(name: str) -> bool:
    """True for the MLLM presets and for checkpoint / config paths whose ``model_type`` is an exported family."""
    return name in PRESETS or config_model_type(name) in FAMILIES


def family_of(kind: str) -> MllmFamily:
    """The family of a ``model_type`` (a typed error naming the supported ones otherwise)."""
    if kind not in FAMILIES:
        raise SourceError(f"model type {kind!r} is not a supported MLLM; supported: {supported()}")
    return FAMILIES[kind]


def mllm_config(name: str) -> tuple[Any, MllmFamily, dict[str, Any]]:
    """``(config, family, processor config)`` of a preset name or a local checkpoint / config directory, without
    building the model."""
    import transformers

    if name in PRESETS:
        family = PRESETS[name]
        preset = family.presets[name]
        return family.preset_config(preset), family, dict(preset.get("processor", {}))
    path = Path(name)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read a Hugging Face config from {name!r}: {e}") from None
    try:
        family = family_of(config.model_type)
    except SourceError as e:
        raise SourceError(f"{name}: {e}") from None
    processor_file = path / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else {}
    return config, family, processor


def host_config(config, family: MllmFamily, processor: dict[str, Any]) -> dict[str, Any]:
    """The host facts of ``config`` (the manifest's ``host``)."""
    return family.host(config, processor)


def build_mllm(name: str, seed: int = 0) -> BuiltLlava:
    """The eager model of a preset name (seeded random weights) or a local checkpoint / config directory."""
    import transformers

    config, family, processor = mllm_config(name)
    cls = getattr(transformers, family.model_class)
    path = Path(name)
    model = pretrained_or_random(cls, config, None if name in PRESETS else path, seed)
    model = model.eval()
    host = family.host(model.config, processor)
    if name in PRESETS:
        return BuiltLlava(model, family.kind, family.tokenizer(), host, family)
    check_supported(name, model, family.rope_rows)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = family.tokenizer()
    return BuiltLlava(model, family.kind, tokenizer, host, family)


def default_capacity(name: str, text) -> int:
    """Cache slots when ``--capacity`` is not given: the preset's value, else the context length (max 4096)."""
    preset = PRESETS[name].presets[name] if name in PRESETS else {}
    return int(preset.get("capacity") or min(text.max_position_embeddings, 4096))
