"""``tokensieve build``: TensorRT engines for every deployable graph of an artifact, with optimization profiles.

Each graph's inputs with symbolic axes get one optimization profile; the ranges come from what the artifact knows:

* ``batch`` (dynamic-batch ViT graphs, stage graphs): ``1 .. max_batch`` (opt 8 or less);
* ``slots`` (the symbolic-K stages of a staged artifact): its smallest .. largest bucket; after the first site also
  ``candidates`` (the previous site's slots, same range) and ``tokens`` (those plus the special tokens);
* MLLM ``sequence``: ``1 .. the longest prompt the runtime accepts`` (opt: one image plus 64 text tokens): the cache
  capacity, except for methods that prefill the whole prompt and then evict or compress the cache (StreamingLLM,
  H2O, SnapKV, ...), whose prompts are bounded by the largest image's tokens plus ``PROMPT_TEXT_TOKENS`` text tokens;
  ``image_tokens``: ``0 ..`` the same bound;
  ``past`` / ``past_kept*`` (growing cache): ``1 .. capacity``; ``patches`` (LLaVA-NeXT vision): ``1 .. 1 + the
  largest grid``; ``vision_tokens`` (MustDrop's ``vision_1``): CLS plus ``n - 8 W .. n`` tokens;
* anything else, or to override: ``dims={"sequence": (1, 512, 2048)}`` (CLI ``--dim sequence=1:512:2048``).

Writes ``DIR/engines/<graph stem>.plan`` (where the trtexec recipes of staged artifacts put theirs) and
``DIR/engines/build.json`` (TensorRT version, typing, precision: INT8 for a quantized artifact's QDQ graphs, each
graph's profile, plan size and build seconds); the folder is built next to the artifact and renamed into place,
so a failed build leaves no partial ``engines/``. The runtime side is
:class:`tokensieve.runtimes.tensorrt.TensorRTRunner` (``Artifact.runner(graph, runtime="tensorrt")``, ``tokensieve
bench --runtime tensorrt``, ``tokensieve parity --replay --runtime tensorrt``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokensieve.artifact.store import ENGINES, plan_path, replaced_directory
from tokensieve.errors import ArtifactError
from tokensieve.manifest import MllmManifest
from tokensieve.runtimes.image_families import image_family

PROMPT_TEXT_TOKENS = 512  # text tokens next to the largest image in the longest prompt an evicting cache is built for


def graph_paths(artifact) -> list[str]:
    """Relative paths of the ONNX files to build: every deployable graph (an image model's baseline too, so the
    engine benchmark has its reference)."""
    paths = [path for path, _ in artifact.graph_files()]
    baseline = artifact.manifest.graphs.get("baseline")
    if artifact.kind != "mllm" and baseline:
        paths.append(baseline)
    return list(dict.fromkeys(paths))


def symbol_ranges(artifact, max_batch: int = 32) -> dict[str, tuple[int, int, int]]:
    """Default ``(min, opt, max)`` of every symbolic axis name the artifact's graphs use (see module docstring)."""
    manifest = artifact.manifest
    ranges = {"batch": (1, min(8, max_batch), max_batch)}
    if (
        artifact.kind == "staged"
    ):  # the symbolic-K chain: slots of a site; after the first site, the previous site's slots
        stages = manifest.stages
        sizes = [k for route in stages["buckets"].values() for k in route]
        low, high, specials = min(sizes), max(sizes), int(stages["specials"])
        ranges["slots"] = ranges["candidates"] = (low, high, high)
        ranges["tokens"] = (specials + low, specials + high, specials + high)
    if artifact.kind != "mllm":
        return ranges
    capacity, image, host = manifest.decoder["capacity"], manifest.image_tokens, manifest.host
    per_image = image.get("count") or image["per_crop"]
    family = image_family(host)
    most = family.most_tiles(host)  # vision runs of the largest image
    ranges |= family.profile_axes(host)  # the family's own vision axes (Qwen-VL's dynamic graph)
    if most > 1:
        ranges["patches"] = (1, min(5, most), most)
    prompt = capacity
    if evicts_prompt(manifest):  # the whole prompt is prefilled, then the cache evicts down to its capacity
        image_max = image.get("count") or image["per_crop"] * most
        prompt = max(capacity, image_max + PROMPT_TEXT_TOKENS)
    ranges |= {
        "sequence": (1, min(prompt, per_image + 64), prompt),
        "image_tokens": (0, min(prompt, per_image), prompt),
        "past": (1, capacity // 2, capacity),
    }
    if "count" in image:  # MustDrop's vision_1: every 3 x 3 window of the square patch grid merged, or none
        side = math.isqrt(image["count"])
        windows = (side // 3) ** 2 if side % 3 == 0 else 0
        ranges["vision_tokens"] = (1 + image["count"] - 8 * windows, 1 + image["count"], 1 + image["count"])
    return ranges


def evicts_prompt(manifest: MllmManifest) -> bool:
    """True when an MLLM artifact's methods take prompts longer than its cache capacity: a StreamingLLM ring or a
    prompt-cache compression (H2O, SnapKV, ...) prefills the whole prompt and keeps only part of it."""
    from tokensieve.methods import methods_from_dicts
    from tokensieve.methods.prompt_cache import PromptCacheCompression
    from tokensieve.methods.streamingllm import StreamingLLM

    methods = methods_from_dicts(manifest.methods)
    return any(isinstance(m, StreamingLLM | PromptCacheCompression) for m in methods)


def range_key(axis: str) -> str:
    """The range a symbolic axis takes: its own, except a growing cache's ``past_kept_<g>``, which takes ``past``'s."""
    return "past" if axis.startswith("past_kept") else axis


def profile_ranges(
    artifact, max_batch: int, dims: Mapping[str, tuple[int, int, int]] | None = None
) -> dict[str, tuple[int, int, int]]:
    """The ranges of every symbolic axis: tokensieve's defaults, overridden by ``dims``, whose axes must be ones the
    artifact's graphs have."""
    import onnx_ir as ir

    dims = dict(dims or {})
    if dims:
        axes = {
            range_key(str(d))
            for onnx in graph_paths(artifact)
            for value in ir.load(artifact.path / onnx).graph.inputs
            for d in value.shape
            if not isinstance(d, int)
        }
        unknown = sorted(set(dims) - axes)
        if unknown:
            raise ArtifactError(
                f"--dim {unknown[0]}: no graph of {artifact.path} has that symbolic axis; "
                f"its axes: {', '.join(sorted(axes)) or 'none (every graph is static)'}"
            )
    return {**symbol_ranges(artifact, max_batch), **dims}


def input_profile(onnx: Path, ranges: Mapping[str, tuple[int, int, int]]) -> dict[str, tuple[list, list, list]]:
    """Min / opt / max shapes of the inputs of ``onnx`` that have symbolic axes (a growing cache's ``past_kept_<g>``
    axes take ``past``'s range)."""
    import onnx_ir as ir

    model = ir.load(onnx)
    profile = {}
    for value in model.graph.inputs:
        dims = [d if isinstance(d, int) else str(d) for d in value.shape]
        if all(isinstance(d, int) for d in dims):
            continue
        resolved: list[list[int]] = [[], [], []]
        for d in dims:
            key = range_key(d) if isinstance(d, str) else d
            if isinstance(d, str) and key not in ranges:
                raise ArtifactError(
                    f"{onnx.name}: input {value.name!r} has the symbolic axis {d!r}, whose range tokensieve does not "
                    f"know; give it: --dim {d}=MIN:OPT:MAX"
                )
            for i in range(3):
                resolved[i].append(d if isinstance(d, int) else ranges[key][i])
        profile[value.name] = (resolved[0], resolved[1], resolved[2])
    return profile


def build_engines(
    artifact,
    *,
    fp16: bool = False,
    max_batch: int = 32,
    dims: Mapping[str, tuple[int, int, int]] | None = None,
) -> dict[str, Any]:
    """Build every graph of ``artifact`` into ``DIR/engines/`` (see module docstring); returns ``build.json``'s
    content."""
    from tokensieve.runtimes.tensorrt import build_engine, require_tensorrt

    version = require_tensorrt()
    ranges = profile_ranges(artifact, max_batch, dims)
    jobs = [(onnx, input_profile(artifact.path / onnx, ranges)) for onnx in graph_paths(artifact)]
    int8 = (
        artifact.manifest.quantization is not None
    )  # QDQ graphs: explicit quantization (the INT8 flag on TensorRT 10)
    tf32 = True if version[0] < 11 else None  # TensorRT 10: TF32 tactics on, as trtexec; 11: the network's types
    report: dict[str, Any] = {
        "fp16": fp16,
        "int8": int8,
        "tf32": tf32,
        "ranges": {k: list(v) for k, v in ranges.items()},
    }
    report["engines"] = {}
    with replaced_directory(artifact.path / ENGINES, f"; check that {artifact.path} is writable") as staging:
        for onnx, profile in jobs:
            plan = staging / plan_path(artifact, onnx).name
            start = time.perf_counter()
            built = build_engine(artifact.path / onnx, plan, profile, fp16=fp16, int8=int8)
            built["seconds"] = round(time.perf_counter() - start, 1)
            report["engines"][onnx] = {"plan": str(Path(ENGINES) / plan.relative_to(staging)), **built}
        (staging / "build.json").write_text(json.dumps(report, indent=2))
    return report
