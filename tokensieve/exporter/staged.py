"""Staged (bucketed) artifacts for adaptive methods: build, calibrate, describe.

Layout of a staged artifact directory::

    stage1.onnx                     input -> stream, order key and count at the first decision site
    stage2_b<K>.onnx                one static graph per bucket: the first site's K slots -> model outputs
                                    (with several sites: stage2_b<K>.onnx ends at the next site, stage3_b<K>_<K2>...)
    dynamic/stage2.onnx ...         the same chain with a symbolic K: the exact-count oracle, and the source of a
                                    single TensorRT engine with one optimization profile per bucket
    padmax.onnx                     one graph, every image padded to the maximum count and masked
    baseline.onnx, weights.data     the unreduced graph and the weights all graphs share
    trt/build_trt10.sh, build_trt11.sh   trtexec recipes (one engine per bucket; one engine with a profile per bucket)
    manifest.json                   "stages": sites, buckets per route, graphs, calibration, MACs, lint per graph

Routing: stage 1 computes each image's count; the dispatcher (:mod:`tokensieve.runtimes.buckets`) sends it to the
smallest bucket that holds it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from tokensieve.artifact.store import save_graph
from tokensieve.errors import MethodSpecError, SourceError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.lint import lint
from tokensieve.graph_passes.locate import ViTLayout
from tokensieve.graph_passes.macs import count_macs
from tokensieve.graph_passes.staging import StagePass, StageSpec
from tokensieve.methods.atp import ATPPrune
from tokensieve.runtimes.buckets import StagedRunner

MAX_TOPK = 3840


class StageBuilder:
    """Builds stage graphs from the saved baseline (each a fresh copy sharing ``weights.data``)."""

    def __init__(self, directory: Path, method: ATPPrune, layout: ViTLayout, lint_target: str):
        self.directory, self.method, self.layout, self.lint_target = directory, method, layout, lint_target
        self.graphs: dict[str, dict[str, Any]] = {}

    def build(self, spec: StageSpec) -> ir.Model:
        model = ir.load(self.directory / "baseline.onnx")
        run_passes(model, [StagePass(self.method, spec, specials=self.layout.specials)])
        return model

    def save(self, model: ir.Model, relative: str, dynamic: bool = False) -> str:
        path = self.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        save_graph(model, path, weights=False)
        report = lint(model, self.lint_target, profiles=dynamic)
        exposed = sorted(
            {
                v.name
                for n in model.graph
                for v in n.outputs
                if v.name.startswith("tokensieve/") and v.name.endswith("/kept")
            }
        )
        inputs = {v.name: [d if isinstance(d, int) else d.value for d in v.shape] for v in model.graph.inputs}
        self.graphs[relative] = {
            "macs": count_macs(model),
            "lint": report.to_dict(),
            "exposed": exposed,
            "inputs": inputs,
        }
        return relative


def _bucket_list(buckets: Sequence[int], candidates: int) -> list[int]:
    sizes = sorted({int(b) for b in buckets})
    if not sizes or sizes[0] < 1:
        raise MethodSpecError(f"buckets must be positive token counts, got {list(buckets)}")
    if sizes[-1] > candidates:
        raise MethodSpecError(f"bucket {sizes[-1]} is larger than the {candidates} candidate tokens at the site")
    if sizes[-1] >= MAX_TOPK:
        raise MethodSpecError(f"bucket {sizes[-1]} exceeds TensorRT's TopK limit ({MAX_TOPK - 1})")
    return sizes


def site_routes(first: list[int], later: list[list[int]]) -> dict[str, list[int]]:
    """Buckets available on every route: ``{"": site-0 buckets, "64": site-1 buckets after bucket 64, ...}``; a
    later site never has more slots than the previous bucket's candidates."""
    routes = {"": first}
    frontier = [("", None)]
    for site, sizes in enumerate([first, *later]):
        nxt = []
        for path, previous in frontier:
            options = sorted({min(s, previous) for s in sizes}) if previous is not None else sizes
            if site:
                routes[path] = options
            nxt += [(f"{path}/{k}" if path else str(k), k) for k in options]
        frontier = nxt
    return routes


def build_chain(builder: StageBuilder, routes: dict[str, list[int]], sites: int) -> dict[str, str]:
    """Static stage graphs after stage 1 for every route; returns ``{route key: relative path}``."""
    S = builder.layout.specials
    graphs = {}
    for path, options in routes.items():
        depth = 0 if not path else len(path.split("/"))
        tokens = builder.layout.tokens if not path else S + int(path.split("/")[-1])
        for size in options:
            key = f"{path}/{size}" if path else str(size)
            end = depth + 1 if depth + 1 < sites else None
            spec = StageSpec(start=depth, start_tokens=tokens, start_slots=size, end=end)
            name = f"stage{depth + 2}_b{key.replace('/', '_')}.onnx"
            graphs[key] = builder.save(builder.build(spec), name)
    return graphs


def build_dynamic_chain(builder: StageBuilder, sites: int) -> dict[str, str]:
    graphs = {"": "stage1.onnx"}
    for depth in range(sites):
        key = "/".join(["*"] * (depth + 1))
        tokens = builder.layout.tokens if depth == 0 else None
        spec = StageSpec(
            start=depth, start_tokens=tokens, start_slots=None, end=depth + 1 if depth + 1 < sites else None
        )
        graphs[key] = builder.save(builder.build(spec), f"stage{depth + 2}_dynamic.onnx", dynamic=True)
    return graphs


def token_outputs(final: Path) -> list[str]:
    """The outputs of the last stage that hold one row per kept token: a symbolic token axis in its symbolic-K
    graph (the dispatcher cuts them to each image's valid tokens; others, such as logits, are per image)."""
    model = ir.load(final)
    return sorted(v.name for v in model.graph.outputs if any(not isinstance(d, int) for d in list(v.shape)[1:]))


def build_padmax(builder: StageBuilder, sites: int) -> str:
    """One graph, every site keeping up to all its candidates (pad to the maximum count, masked)."""
    tokens, inline = builder.layout.tokens, {}
    for site in range(sites):
        inline[site] = tokens - builder.layout.specials
    return builder.save(builder.build(StageSpec(inline=inline)), "padmax.onnx")


def scores_at_first_site(builder: StageBuilder, data: np.ndarray, batch: int = 16) -> np.ndarray:
    """Normalised CLS scores at the first site for every calibration image (``[M, n]``)."""
    from tokensieve.runtimes.ort import OrtRunner

    layer = builder.method.layers[0]
    model = builder.build(StageSpec(end=0))
    name = next(
        v.name for n in model.graph for v in n.outputs if v.name.startswith(f"tokensieve/site{layer}/normalized")
    )
    path = builder.directory / ".calibration_stage1.onnx"
    save_graph(model, path, weights=False)
    try:
        runner = OrtRunner(path, extra_outputs=[name])
        return np.concatenate(
            [runner.run({runner.input_names[0]: data[i : i + batch]})[name] for i in range(0, len(data), batch)]
        )
    finally:
        path.unlink(missing_ok=True)


def oracle_counts(directory: Path, stages: dict, data: np.ndarray, batch: int = 16) -> list[list[int]]:
    """Kept counts per site on calibration data, through the exact-count (dynamic) chain."""
    runner = StagedRunner(directory, stages, mode="oracle")
    counts: list[list[int]] = [[] for _ in stages["sites"]]
    for i in range(0, len(data), batch):
        for route in runner.run(data[i : i + batch]).routes:
            for site, count in enumerate(route.counts):
                counts[site].append(count)
    return counts


def load_data(path: str | os.PathLike, shape, mean, std, limit: int | None = 512) -> np.ndarray:
    from tokensieve.calibration.data import load_calibration

    data = load_calibration(path, shape, mean, std, limit=limit)
    if len(data) < 2:
        raise SourceError(f"calibration data {path} holds {len(data)} image(s); give at least a few dozen")
    return data


def _shapes(inputs: dict[str, list], batch: int, slots: int | None = None) -> str | None:
    """``name:BxNxC,...`` for trtexec; None when a symbolic axis other than batch/slots remains."""
    parts = []
    for name, dims in inputs.items():
        resolved = [batch if axis == 0 else (slots if d == "slots" else d) for axis, d in enumerate(dims)]
        if any(not isinstance(d, int) for d in resolved):
            return None
        parts.append(f"{name}:{'x'.join(map(str, resolved))}")
    return ",".join(parts)


def _profile(inputs: dict[str, list], max_batch: int, slots: int | None = None) -> str:
    return " ".join(
        f"--{kind}Shapes={_shapes(inputs, batch, slots)}"
        for kind, batch in (("min", 1), ("opt", 8), ("max", max_batch))
    )


def trt_recipes(stages: dict, max_batch: int = 32, int8: bool = False) -> dict[str, str]:
    """trtexec command lines for TensorRT 10.x and 11.x: one engine per static stage graph (bucket), and one engine
    for the first symbolic-K stage with one optimization profile per bucket. Written against the documented CLI
    (docs/deploy.md#tensorrt-versions: 11.x has no precision flags, FP16 from ModelOpt AutoCast); not executed here.
    ``int8``: the graphs are QDQ-quantized: 10.x adds ``--int8`` (explicit quantization, the scales from the graph),
    11.x builds them as they are (strongly typed by their Q/DQ nodes, the rest float32)."""
    info = stages["graph_info"]
    jobs = []  # (onnx path, engine path, shape arguments, comment)
    for key, path in stages["graphs"].items():
        jobs.append(
            (
                path,
                f"engines/{Path(path).stem}.plan",
                _profile(info[path]["inputs"], max_batch),
                f"route {key}" if key else "stage 1",
            )
        )
    first = stages["dynamic"].get("*")
    if first is not None:
        profiles = " ".join(
            f"--profile={i} {_profile(info[first]['inputs'], max_batch, k)}"
            for i, k in enumerate(stages["buckets"][""])
        )
        jobs.append((first, "engines/stage2_profiles.plan", profiles, "one engine, one profile per bucket"))
    header = (
        "#!/usr/bin/env bash\n# Generated by tokensieve: TensorRT engines for this staged artifact. Run from the "
        "artifact directory.\n# Written against the documented trtexec CLI; not executed by tokensieve.\n"
        "set -euo pipefail\nmkdir -p engines\n"
    )
    flags = "--fp16 --int8" if int8 else "--fp16"
    trt10 = [
        f"trtexec --onnx={onnx} --saveEngine={engine} {flags} {shapes}  # {note}" for onnx, engine, shapes, note in jobs
    ]
    trt11 = []
    for onnx, engine, shapes, note in jobs:
        typed = onnx
        if not int8:
            typed = onnx.replace(".onnx", "_fp16.onnx")
            trt11.append(f"python -m modelopt.onnx.autocast --onnx_path {onnx} --output_path {typed}")
        trt11.append(f"trtexec --onnx={typed} --saveEngine={engine} {shapes}  # {note}")
    typing = "INT8 from the Q/DQ nodes" if int8 else "no --fp16"
    return {
        "build_trt10.sh": header + "\n".join(trt10) + "\n",
        "build_trt11.sh": header + f"# TensorRT 11 is strongly typed: {typing}.\n" + "\n".join(trt11) + "\n",
    }


def _cost_model(builder: StageBuilder, site: int, tokens: int, sites: int):
    """MACs of the stage after ``site`` as a function of its bucket size (exact quadratic through 3 sizes)."""
    from tokensieve.calibration.buckets import quadratic_cost

    n = tokens - builder.layout.specials
    points = []
    for slots in sorted({max(1, n // 4), max(2, n // 2), n}):
        spec = StageSpec(start=site, start_tokens=tokens, start_slots=slots, end=site + 1 if site + 1 < sites else None)
        points.append((slots, float(count_macs(builder.build(spec)))))
    return quadratic_cost(points if len(points) >= 3 else [*points, *points][:3])


def build_staged(
    directory: Path,
    method: ATPPrune,
    layout: ViTLayout,
    *,
    buckets,
    max_buckets: int,
    data: np.ndarray | None,
    target_keep: float | None,
    allow_truncation: bool,
    lint_target: str,
) -> tuple[dict, ATPPrune]:
    """Write every stage graph of ``method`` into ``directory`` (which holds ``baseline.onnx``); returns the
    manifest's ``stages`` entry and the method as calibrated."""
    from tokensieve.calibration.buckets import choose_buckets
    from tokensieve.calibration.threshold import calibrate_threshold, keep_fraction

    S, sites = layout.specials, len(method.layers)
    builder = StageBuilder(directory, method, layout, lint_target)
    calibration: dict[str, Any] = {"samples": 0 if data is None else len(data)}
    if target_keep is not None:
        if data is None:
            raise MethodSpecError("--target-keep needs calibration data (--calibrate DATA)")
        scores = scores_at_first_site(builder, data)
        grid = np.zeros(scores.shape[1], dtype=bool)
        grid[method.grid_positions(scores.shape[1])] = True
        threshold = calibrate_threshold(scores, grid, target_keep)
        method = builder.method = method.with_threshold(threshold)
        calibration |= {
            "target_keep": target_keep,
            "threshold": threshold,
            "achieved_keep": keep_fraction(scores, grid, threshold),
        }
    stages: dict[str, Any] = {
        "method": method.to_dict(),
        "sites": list(method.layers),
        "specials": S,
        "tokens": layout.tokens,
        "allow_truncation": allow_truncation,
    }
    stages["graphs"] = {"": builder.save(builder.build(StageSpec(end=0)), "stage1.onnx")}
    stages["dynamic"] = build_dynamic_chain(builder, sites)
    stages["exposed"] = {path: info["exposed"] for path, info in builder.graphs.items()}
    stages["token_outputs"] = token_outputs(directory / stages["dynamic"]["/".join(["*"] * sites)])
    candidates = layout.tokens - S
    if buckets == "auto":
        if data is None:
            raise MethodSpecError("--buckets auto needs calibration data (--calibrate DATA)")
        counts = oracle_counts(directory, stages, data)
        plans, tokens = [], layout.tokens
        for site in range(sites):
            cost = _cost_model(builder, site, tokens, sites)
            plans.append(choose_buckets(counts[site], max_buckets, cost))
            tokens = S + plans[-1].sizes[-1]
        calibration |= {
            "counts": {
                "min": [min(c) for c in counts],
                "max": [max(c) for c in counts],
                "mean": [float(np.mean(c)) for c in counts],
            },
            "plans": [p.to_dict() for p in plans],
        }
        per_site = [p.sizes for p in plans]
    elif buckets:
        per_site = [_bucket_list(buckets, candidates)] * sites
    else:
        raise MethodSpecError(
            f"{method.name} keeps a data-dependent number of tokens: give --buckets auto "
            "--calibrate DATA, or explicit --buckets 64,96,128"
        )
    routes = site_routes(_bucket_list(per_site[0], candidates), per_site[1:])
    stages["buckets"] = routes
    stages["graphs"] |= build_chain(builder, routes, sites)
    stages["padmax"] = build_padmax(builder, sites)
    stages["graph_info"] = builder.graphs
    stages["exposed"] = {path: info["exposed"] for path, info in builder.graphs.items()}
    stages["calibration"] = calibration
    write_recipes(directory, stages)
    return stages, method


def write_recipes(directory: Path, stages: dict, int8: bool = False) -> None:
    """``DIR/trt/build_trt10.sh`` and ``build_trt11.sh`` (:func:`trt_recipes`), executable."""
    trt = directory / "trt"
    trt.mkdir(exist_ok=True)
    for name, text in trt_recipes(stages, int8=int8).items():
        (trt / name).write_text(text)
        (trt / name).chmod(0o755)
