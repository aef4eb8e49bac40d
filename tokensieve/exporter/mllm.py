"""Write an MLLM artifact: LLaVA / LLaVA-NeXT split into vision, embed, prefill and decode graphs.

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

import datetime
import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.artifact.manifest import FORMAT, FORMAT_VERSION
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
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.atp_scores import ATPScoresPass
from tokensieve.graph_passes.cache_visibility import CacheVisibilityPass
from tokensieve.graph_passes.cut_prefill import CutPrefillPass
from tokensieve.graph_passes.dual_attention import DualAttentionPass
from tokensieve.graph_passes.fastv import FastVPass
from tokensieve.graph_passes.heavy_hitters import HeavyHitterPass
from tokensieve.graph_passes.image_attention import ImageAttentionMassPass
from tokensieve.graph_passes.lint import lint
from tokensieve.graph_passes.locate_decoder import locate_decoder
from tokensieve.graph_passes.prompt_cache import PromptCachePass
from tokensieve.graph_passes.split_cache_slot import SplitCacheSlotPass
from tokensieve.graph_passes.split_positions import SplitPositionsPass
from tokensieve.methods.atp_llava import ATPLLaVA
from tokensieve.methods.dyvte import DyVTE
from tokensieve.methods.fastv import FastV
from tokensieve.methods.globalcom2 import GlobalCom2
from tokensieve.methods.h2o import H2O
from tokensieve.methods.mustdrop import MustDrop
from tokensieve.methods.prompt_cache import PromptCacheCompression
from tokensieve.methods.streamingllm import StreamingLLM
from tokensieve.runtimes.llava_image import crop_tokens

# graphs with symbolic axes: deployable with TensorRT optimization profiles (see `tokensieve lint`)
DYNAMIC = {
    "vision": "patches (LLaVA-NeXT: thumbnail + crops, from the image's grid resolution)",
    "embed": "sequence",
    "prefill": "sequence",
    "decode_growing": "past (the cache grows by one position per step)",
}


def export_mllm(
    spec: SourceSpec,
    out: str | os.PathLike,
    *,
    method: FastV | ATPLLaVA | DyVTE | MustDrop | GlobalCom2 | StreamingLLM | PromptCacheCompression | None = None,
    capacity: int | None = None,
    opset: int = 18,
    growing: bool = True,
    lint_target: str = "trt10.3",
) -> Artifact:
    from tokensieve.converters.llava import (
        build_llava,
        decoder_geometry,
        default_capacity,
        export_llava,
        vision_geometry,
    )
    from tokensieve.converters.sources import weights_digest
    from tokensieve.errors import SourceError

    built = build_llava(spec.name, spec.seed)
    text = built.model.config.text_config
    if capacity is None:  # H2O needs budget + 1 slots; more would stay unused
        capacity = method.slots() if isinstance(method, H2O) else default_capacity(spec.name, text)
    if capacity < 2:
        raise SourceError(f"--capacity must be at least 2 cache slots, got {capacity}")
    # validate before the (slow) export
    windows = None  # MustDrop's vision windows (when it merges)
    if isinstance(method, FastV):
        method.validate(text.num_hidden_layers)
    elif isinstance(method, (ATPLLaVA, DyVTE)):
        method.validate(built.kind, text.num_hidden_layers)
        if isinstance(method, ATPLLaVA) and method.grid:
            method.grid_positions(_image_tokens(built)["count"])
    elif isinstance(method, MustDrop):
        count = _image_tokens(built).get("count", 0)
        method.validate(built.kind, text.num_hidden_layers, built.host["select_strategy"], count)
        windows = None if method.merge_threshold is None else method.windows(count)
    elif isinstance(method, (StreamingLLM, PromptCacheCompression)):
        method.validate(capacity)
    elif isinstance(method, GlobalCom2):
        method.validate(built.kind, built.host["select_strategy"])
    growing = growing and not isinstance(method, H2O)
    mustdrop = isinstance(method, MustDrop)
    cls_scores = isinstance(method, GlobalCom2)
    graphs, seconds = export_llava(
        built, capacity, opset, growing, cls_scores=cls_scores, split_vision=mustdrop, windows=windows
    )
    if isinstance(method, FastV):
        run_passes(graphs["prefill"], [FastVPass(method)])
    elif isinstance(method, (ATPLLaVA, DyVTE, MustDrop)):  # counts decided on the host, between prefill segments
        graphs = _split_prefill(graphs, method)
        seconds.update({f"prefill_{i}": seconds["prefill"] for i in range(len(method.cuts) + 1)})
        del seconds["prefill"]
    if isinstance(method, (FastV, ATPLLaVA, DyVTE, MustDrop)):  # one cache length per group of layers after a cut
        for key in ("decode", "decode_growing"):
            if key in graphs:
                passes = [SplitCacheSlotPass(first, g) for g, first in enumerate(method.cache_cuts)]
                run_passes(graphs[key], passes + [SplitPositionsPass(method.cache_cuts[0])] * mustdrop)
    elif isinstance(method, StreamingLLM):  # the growing cache is cut on the host; the fixed one becomes a ring
        run_passes(graphs["decode"], [CacheVisibilityPass()])
    elif isinstance(method, PromptCacheCompression):
        run_passes(graphs["prefill"], [PromptCachePass(method)])
        if isinstance(method, H2O):  # evicts in the fixed decode graph, which has no growing-cache form
            run_passes(graphs["decode"], [CacheVisibilityPass(), HeavyHitterPass(method)])
    decoders = {key: model for key, model in graphs.items() if key[:6] not in ("vision", "embed")}
    sites = {key: locate_decoder(model).summary() for key, model in decoders.items()}
    dynamic = {k: v for k, v in DYNAMIC.items() if k in graphs and (k != "vision" or built.kind == "llava_next")}
    if isinstance(method, FastV):
        dynamic["prefill"] = "sequence and image_tokens (FastV: the kept length is an expression of both)"
    if mustdrop:
        dynamic["vision_1"] = "vision_tokens (CLS + the tokens left after the window merge)"
    if isinstance(method, (ATPLLaVA, DyVTE, MustDrop)):
        dynamic.update(
            {key: "sequence (the positions kept so far) and image_tokens" for key in graphs if key[:8] == "prefill_"}
        )
        dynamic[f"prefill_{len(method.cuts)}"] = "sequence (the positions the last cut keeps)"
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
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "mllm",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "source": spec.to_dict(),
            "architecture": type(built.model).__name__,
            "weights_sha256": weights_digest(built.model),
            "export": {"exporter": "dynamo", "opset": opset, "seconds": seconds},
            "methods": [method.to_dict()] if method else [],
            "method_text": method.describe() if method else "none",
            "graphs": {**files, "external_data": "weights.data"},
            "dynamic": dynamic,
            "io": {
                key: dict(zip(("inputs", "outputs"), describe_io(model), strict=True)) for key, model in graphs.items()
            },
            "decoder": {**decoder_geometry(text), "capacity": capacity},
            "vision": vision_geometry(built.model.config),
            "image_tokens": _image_tokens(built),
            "sites": sites,
            "host": built.host,
            "tokenizer": "tokenizer/tokenizer.json",
            "lint_target": lint_target,
            "lint": lints,
        }
        write_manifest(staging, manifest)
    return Artifact.load(Path(out))


SCORES = {ATPLLaVA: ATPScoresPass, DyVTE: ImageAttentionMassPass, MustDrop: DualAttentionPass}


def _split_prefill(graphs: dict[str, Any], method: ATPLLaVA | DyVTE | MustDrop) -> dict[str, Any]:
    """``prefill`` -> ``prefill_0 .. prefill_n``: the segments between the cuts, each but the last with the scores of
    its last layer (the layer before the next cut): ATP-LLaVA's redundancy scores, DyVTE's attention mass or
    MustDrop's dual attention."""
    score = SCORES[type(method)]
    full = graphs["prefill"]
    bounds = [0, *method.cuts, None]
    segments = {}
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        segment = full if end is None else full.clone()  # clones share the weights' tensors; the last is the original
        run_passes(segment, [*([score(end - 1)] if end else []), CutPrefillPass(start, end)])
        segments[f"prefill_{index}"] = segment
    ordered: dict[str, Any] = {}
    for key, model in graphs.items():
        ordered.update(segments if key == "prefill" else {key: model})
    return ordered


def _image_tokens(built) -> dict[str, Any]:
    """How many sequence positions one image takes: fixed for LLaVA, a function of the image size for NeXT."""
    host = built.host
    per_crop = crop_tokens(host)
    if built.kind == "llava":
        return {"count": per_crop, "varies_with_image_size": False}
    return {"per_crop": per_crop, "varies_with_image_size": True, "rule": "thumbnail + unpadded grid + newline per row"}
