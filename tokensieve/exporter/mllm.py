"""Write an MLLM artifact: LLaVA / LLaVA-NeXT / InternVL split into vision, embed, prefill and decode graphs.

With a decoder method (``fastv``), its graph passes rewrite the exported graphs before they are written: FastV into
the prefill graph (new input ``image_positions``, new output ``kept_positions``), and the decode graphs' later
layers onto their own cache length (fixed cache: new input ``pruned_cache_position``). With ``streamingllm`` the
fixed-cache decode graph gets a ``visible_slots`` input, so the runtime can use the cache as a ring. With ``snapkv`` or
``a2sf`` the prefill graph's ``present_*`` outputs are the compressed prompt cache (new output ``cache_positions``); the
decode graphs are unchanged (the runtime writes new tokens after the compressed prompt). ``h2o`` compresses the
prompt the same way (plus output ``cache_scores``) and moves eviction into the fixed-capacity decode graph (inputs
``visible_slots``, ``write_slots``, ``slot_positions``, ``h2o_scores``; outputs ``updated_h2o_scores``,
``evict_slots``); it has no growing-cache decode graph. ``globalcom2`` (LLaVA-NeXT) adds the vision graph's output
``cls_scores``, from which the host selects the image tokens; the decoder graphs are unchanged. ``atp_llava`` (plain
LLaVA) replaces ``prefill.onnx`` by one segment per span between its cuts, ``prefill_0.onnx .. prefill_n.onnx``
(input ``hidden_states`` instead of ``inputs_embeds`` after the first; all but the last: new input
``image_positions``, outputs ``hidden_states_out`` and the scores ``image_self_score`` / ``image_cross_score``); its
decode graphs are FastV's with one write-slot input per cut. ``dyvte`` is cut the same way, its segments scoring
``image_attention_mass``.

Layout::

    DIR/
      manifest.json       kind "mllm": graphs, I/O, decoder geometry and cache capacity, decoder sites, host
                          preprocessing and prompt facts, export seconds, lint per graph, versions
      vision.onnx  embed.onnx  prefill.onnx  decode.onnx  [decode_growing.onnx]
      weights.data        every graph's weights, each stored once (the decoder layers are shared)
      image_newline.npy   LLaVA-NeXT's row separator, used by the host when it packs crop features
      tokenizer/          tokenizer.json (+ config) for the runtime

Written atomically like every artifact (a temporary sibling directory renamed into place).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tokensieve.artifact.store import (
    Artifact,
    check_file,
    describe_io,
    save_shared,
    staged_directory,
    versions,
    write_manifest,
)
from tokensieve.converters.sources import SourceSpec
from tokensieve.graph_passes import FACES
from tokensieve.graph_passes.lint import lint
from tokensieve.graph_passes.locate_decoder import locate_decoder
from tokensieve.manifest import MllmManifest
from tokensieve.methods.decoder import DecoderContext, DecoderMethod
from tokensieve.runtimes import FACES as RUNTIME_FACES

# graphs with symbolic axes: deployable with TensorRT optimization profiles (see `tokensieve lint`)
DYNAMIC = {
    "vision": "patches (LLaVA-NeXT: thumbnail + crops; InternVL: tiles + thumbnail; from the image's size)",
    "vision_dynamic": "patches (Qwen-VL: any grid, for ONNX Runtime; TensorRT takes the static bucket graphs)",
    "embed": "sequence",
    "prefill": "sequence",
    "decode_growing": "past (the cache grows by one position per step)",
}


def export_mllm(
    spec: SourceSpec,
    out: str | os.PathLike,
    *,
    method: DecoderMethod | None = None,
    capacity: int | None = None,
    opset: int = 18,
    growing: bool = True,
    lint_target: str = "trt10.3",
    buckets: list | None = None,
) -> Artifact:
    from tokensieve.converters.families import build_mllm, default_capacity
    from tokensieve.converters.llava import decoder_geometry, export_llava
    from tokensieve.converters.sources import weights_digest

    buckets = _before_build(spec.name, buckets)  # source and buckets checked before the (slow) build
    built = build_mllm(spec.name, spec.seed)
    text = built.model.config.text_config
    if capacity is None:  # e.g. H2O needs budget + 1 slots; more would stay unused
        capacity = (method and method.fixed_capacity()) or default_capacity(spec.name, text)
    windows = _validate(built, method, capacity)  # before the (slow) export
    growing = growing and (method is None or method.growing_cache)
    split_vision, cls_scores = bool(method and method.split_vision), bool(method and method.cls_scores)
    graphs, seconds = export_llava(built, capacity, opset, growing, cls_scores, split_vision, windows, buckets)
    if method is not None:  # facts the method finds by running its graphs ("settle"), then its graph passes ("export")
        settle = RUNTIME_FACES.lookup("settle", method, None)
        method = method if settle is None else settle(graphs, method)
        graphs = FACES.lookup("export", method)(graphs, method)
    if "prefill" not in graphs:  # cut into segments, each exported with the prefill
        seconds.update({key: seconds["prefill"] for key in graphs if key[:8] == "prefill_"})
        del seconds["prefill"]
    decoders = {key: model for key, model in graphs.items() if key[:6] not in ("vision", "embed")}
    sites = {key: locate_decoder(model).summary() for key, model in decoders.items()}
    dynamic = {k: v for k, v in DYNAMIC.items() if k in graphs and (k != "vision" or built.family.tiled)}
    dynamic.update(method.dynamic(graphs) if method else {})
    lints = {key: lint(model, lint_target, profiles=key in dynamic).to_dict() for key, model in graphs.items()}
    files = {key: f"{key}.onnx" for key in graphs}
    with staged_directory(out) as staging:
        save_shared(graphs, staging, files)
        for name in files.values():
            check_file(staging / name)
        built.tokenizer.save_pretrained(staging / "tokenizer")
        newline = getattr(built.model.model, "image_newline", None)
        if newline is not None:
            np.save(staging / "image_newline.npy", newline.detach().float().numpy())
        manifest = MllmManifest(
            versions=versions(),
            source=spec.to_dict(),
            architecture=type(built.model).__name__,
            weights_sha256=weights_digest(built.model),
            export={"exporter": "dynamo", "opset": opset, "seconds": seconds},
            methods=[method.to_dict()] if method else [],
            method_text=method.describe() if method else "none",
            graphs={**files, "external_data": "weights.data"},
            dynamic=dynamic,
            io={
                key: dict(zip(("inputs", "outputs"), describe_io(model), strict=True)) for key, model in graphs.items()
            },
            decoder={**decoder_geometry(text), "capacity": capacity},
            vision=built.family.vision_geometry(built.model.config),
            image_tokens=built.family.image_tokens(built.host),
            sites=sites,
            host=built.host,
            tokenizer="tokenizer/tokenizer.json",
            lint_target=lint_target,
            lint=lints,
        )
        write_manifest(staging, manifest)
    return Artifact.load(Path(out))


def _before_build(name: str, buckets: list | None) -> list | None:
    """The vision bucket grids of a family that exports its tower per grid (Qwen-VL: ``buckets`` checked, or the
    defaults); ``buckets`` given to another family is a :class:`MethodSpecError`, a planning-only preset (full
    depth, too large to export here) a :class:`SourceError`; both before the model is built."""
    from tokensieve.converters.families import host_config, mllm_config
    from tokensieve.errors import MethodSpecError, SourceError

    config, family, processor = mllm_config(name)
    planning = family.presets.get(name, {}).get("plan_only")
    if planning:
        bench = [f"hf:{n}" for n, preset in family.presets.items() if not preset.get("plan_only")]
        raise SourceError(
            f"hf:{name} is a planning preset ({planning}) for `tokensieve plan`; export a smaller preset "
            f"({', '.join(bench)}) or a checkpoint directory"
        )
    if family.buckets is None:
        if buckets is not None:
            raise MethodSpecError(f"--buckets (vision grids) apply to Qwen-VL's vision tower, not to {family.title}")
        return None
    return family.buckets(host_config(config, family, processor), buckets)


def _validate(built, method: DecoderMethod | None, capacity: int) -> list[list[int]] | None:
    """Check ``capacity`` and ``method`` against the model; the vision windows the split vision graph scores."""
    from tokensieve.errors import MethodSpecError, SourceError

    family = built.family
    if capacity < 2:
        raise SourceError(f"--capacity must be at least 2 cache slots, got {capacity}")
    if method is None:
        return None
    if family.vision_graphs is not None and (method.split_vision or method.cls_scores):
        raise MethodSpecError(
            f"{method.name} works inside the vision graph, but {family.title}'s vision tower exports as one graph "
            "per grid bucket; use a decoder-side method (fastv, snapkv, a2sf, h2o, streamingllm, dyvte)"
        )
    if family.rope_rows > 1 and method.contiguous_positions:
        raise MethodSpecError(
            f"{method.name} renumbers the positions after a cut, but {family.title}'s kept tokens keep their "
            "multimodal (t, h, w) rotary positions, which cannot be renumbered; use fastv or dyvte"
        )
    layers, count = built.model.config.text_config.num_hidden_layers, family.image_tokens(built.host)
    context = DecoderContext(
        layers, built.kind, built.host["select_strategy"], count.get("count", 0), capacity, family.layout
    )
    method.validate(context)
    return method.vision_windows(count.get("count", 0))
