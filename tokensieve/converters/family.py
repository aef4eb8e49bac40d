"""What one MLLM family declares to the converter: how its configs, presets, eager model, vision graph, tokenizer
and host facts are made. The table of families is :data:`tokensieve.converters.families.FAMILIES`; generic code
looks a family up there (by preset name or checkpoint ``model_type``) and never branches on its name.

The host side of a family (its numpy image processor and image-token layout, torch-free) is declared separately in
:mod:`tokensieve.runtimes.image_families`, found by the manifest's ``host["kind"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MllmFamily:
    """One MLLM family (a converter + a host-side processor + the shared decoder adapter).

    ``layout`` is the image-token layout methods are validated against (:class:`DecoderContext`): ``"grid"`` (one
    square grid of patch tokens: LLaVA), ``"anyres"`` (LLaVA-NeXT's thumbnail + unpadded crop grid with row
    newlines), ``"tiles"`` (InternVL's tiles + thumbnail, each tile's tokens pixel-shuffled), ``"mrope"`` (Qwen-VL's
    merged patch grid of any size, with three-row position ids).

    ``vision_graphs`` replaces the single ``vision`` graph for towers that take a grid-dependent input (Qwen-VL: one
    static graph per bucket grid and one with a symbolic patch count), for the grids ``buckets(host, given)``
    resolves (the defaults when ``given`` is ``None``; a typed error for bad ones); ``rope_rows`` is the number of
    position-id rows the language model's rotary embedding takes (3: mRoPE's temporal, height and width rows): its
    prefill graph takes ``position_ids [rope_rows, T]`` and its decode graphs add a ``rope_delta`` input to the
    sequence index."""

    kind: str  # the Hugging Face ``model_type``, recorded as the manifest's ``host["kind"]``
    title: str  # its name in messages ("LLaVA-NeXT")
    model_class: str  # the transformers class of the eager model
    presets: dict[str, dict[str, Any]]  # named random configurations
    preset_config: Callable[[dict[str, Any]], Any]  # preset -> transformers config
    host: Callable[[Any, dict[str, Any]], dict[str, Any]]  # (config, processor config) -> host facts
    vision: Callable[[Any, bool], Any]  # (model, cls_scores) -> the vision graph's module
    tokenizer: Callable[[], Any]  # the tokenizer of presets (and of checkpoints without one)
    hf_processor: Callable[[dict[str, Any], Any], Any]  # (host, tokenizer) -> the HF processor parity runs
    vision_geometry: Callable[[Any], dict[str, int] | None]  # what ``plan`` costs the vision graph with
    image_tokens: Callable[[dict[str, Any]], dict[str, Any]]  # the manifest's ``image_tokens``
    layout: str = "grid"
    tiled: bool = False  # the vision graph takes a symbolic number of tiles / crops
    # (model, host, opset, grids) -> {graph key: onnx-ir model} when the tower is not one ``vision`` graph
    vision_graphs: Callable[[Any, dict[str, Any], int, Any], dict[str, Any]] | None = None
    buckets: Callable[[dict[str, Any], Any], Any] | None = None  # (host, given buckets) -> the grids to export
    rope_rows: int = 1
