"""Parity of a staged (bucketed) artifact against the eager reference, which drops tokens exactly, image by image.

Checked on the same seeded inputs:

* every routing mode -- ``bucketed`` (static graph per bucket), ``oracle`` (symbolic K at the exact count) and
  ``padmax`` (one graph, padded and masked) -- gives the eager outputs on valid tokens, and the bucketed chain keeps
  the same tokens at every site;
* edge counts per first-site bucket, forced by editing stage 1's order key and count (the eager reference keeps the
  same highest-priority tokens): a count that exactly fits the bucket, one over the previous bucket's edge (the
  smallest count routed to this bucket), and the largest bucket filled.

The eager side of every check (its outputs and kept tokens per image) is recorded with the inputs in
``DIR/golden/staged.npz``; :func:`replay_staged_golden` repeats the checks from it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokensieve.errors import ParityError
from tokensieve.graph_passes.sites.atp import KEPT_WEIGHT
from tokensieve.parity.report import (
    OutputParity,
    ParityReport,
    StagedCheck,
    compare_outputs,
    read_golden,
    save_arrays,
    write_golden,
)
from tokensieve.runtimes.buckets import StagedResult, StagedRunner

STAGED = "staged.npz"


@dataclass
class EagerCheck:
    """The eager side of one check: ``count`` forces the first site's count (None: each image's own counts)."""

    label: str
    count: int | None
    outputs: list  # per graph output: an array, or a per-image list for variable-length outputs
    kept: list[dict[int, np.ndarray]]  # per image: site layer -> kept token indices
    mode: str = "bucketed"  # the routing mode it holds; a quantized artifact's oracle and padmax have their own


def _relative(names, eager, result: StagedResult, tolerance: float) -> tuple[float, bool]:
    worst = 0.0
    for name, ref in zip(names, eager, strict=True):
        got = result.outputs[name]
        refs = ref if isinstance(ref, list) else list(ref)
        gots = got if isinstance(got, list) else list(got)
        for r, g in zip(refs, gots, strict=True):
            r, g = np.asarray(r), np.asarray(g)
            if r.shape != g.shape:
                return float("inf"), False
            worst = max(worst, float(np.abs(g - r).max() / (np.abs(r).max() or 1.0)))
    return worst, worst <= tolerance


def _same_kept(
    runner: StagedRunner, result: StagedResult, kept: list[dict[int, np.ndarray]], layers, required: float
) -> int:
    """Images whose kept tokens agree with the eager ones at every site: the same set, or (``required`` < 1, a
    quantized artifact) at least that share of the site's candidates with the same kept / dropped status."""
    same = 0
    for i, route in enumerate(result.routes):
        ok = True
        candidates = runner.stages["tokens"] - runner.specials
        for site, layer in enumerate(layers):
            got = runner.exposed.get(i, {}).get(f"tokensieve/site{layer}/kept")
            count = min(route.counts[site], route.buckets[site])
            if got is None:
                ok = False
                break
            differ = np.setxor1d(got[:count], kept[i][layer]).size
            ok &= differ == 0 if required >= 1 else 1 - differ / candidates >= required
            candidates = count
        same += int(ok)
    return same


def _graph_counts(result: StagedResult, layers) -> list[dict[int, int]]:
    """Per image, the count the graph kept at every site (what a quantized artifact's eager side is forced to)."""
    return [{layer: min(c, b) for layer, c, b in zip(layers, r.counts, r.buckets, strict=True)} for r in result.routes]


def _eager(
    model, pixels, label: str, count: int | None, forced: list[dict[int, int]], mode: str = "bucketed"
) -> EagerCheck:
    import torch

    with torch.no_grad():
        out = model.per_image(torch.from_numpy(pixels), forced=forced)
    out = out if isinstance(out, tuple) else (out,)
    outputs = [[t.numpy() for t in o] if isinstance(o, list) else o.numpy() for o in out]
    kept = [{layer: rec["kept"].numpy().reshape(-1) for layer, rec in image.items()} for image in model.sample_records]
    return EagerCheck(label, count, outputs, kept, mode)


def force_count(state: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """Stage-1 outputs edited so that exactly ``count`` candidates are kept: the highest-priority ones."""
    key = state["priority"]
    priority = np.where(key >= KEPT_WEIGHT, key - KEPT_WEIGHT, key)
    rank = np.argsort(-priority, axis=1, kind="stable")
    kept = np.zeros_like(key, dtype=bool)
    np.put_along_axis(kept, rank[:, :count], True, axis=1)
    return {
        **state,
        "priority": (priority + KEPT_WEIGHT * kept).astype(key.dtype),
        "count": np.full_like(state["count"], count),
    }


def _edges(sizes: list[int]) -> list[tuple[int, str]]:
    """(forced count, label) per first-site bucket: exact fit, one over the previous bucket, the largest full."""
    edges = []
    for index, size in enumerate(sizes):
        here = {size: "exact fit" if index + 1 < len(sizes) else "largest bucket, full"}
        if index and sizes[index - 1] + 1 < size:
            here[sizes[index - 1] + 1] = f"one over bucket {sizes[index - 1]}"
        edges += sorted(here.items())
    return edges


def check_staged_parity(
    artifact,
    eager_model,
    pixels: np.ndarray,
    tolerance: float,
    providers: list[str] | None,
    golden: bool = True,
    required: float = 1.0,
) -> ParityReport:
    """Every check against the eager reference. ``required`` < 1 (a quantized artifact's drift budget): the INT8
    stage 1 may count differently from the float32 reference, so the eager side keeps, at every site, the count the
    graph kept (its own highest-priority tokens); the kept tokens then agree on at least ``required`` of the
    candidates and the outputs within ``tolerance``."""
    stages = artifact.manifest.stages
    layers = stages["sites"]
    runner = _runner(artifact, providers)
    state = runner.first_stage(pixels)
    natural = runner.continue_from(state)
    if required < 1:
        forced = _graph_counts(natural, layers)
    else:
        forced = [
            {layers[s]: r.buckets[s] for s in range(len(layers)) if r.counts[s] > r.buckets[s]} for r in natural.routes
        ]
    checks = [_eager(eager_model, pixels, "natural counts", None, forced)]
    if required < 1:  # each INT8 routing mode's graphs count for themselves
        for mode in ("oracle", "padmax"):
            result = _runner(artifact, providers, mode=mode).run(pixels)
            checks.append(_eager(eager_model, pixels, "natural counts", None, _graph_counts(result, layers), mode))
    for count, label in _edges(stages["buckets"][""]):
        if required < 1:
            forced = _graph_counts(runner.continue_from(force_count(state, count)), layers)
        else:
            forced = [{layers[0]: count} for _ in pixels]
        checks.append(_eager(eager_model, pixels, label, count, forced))
    report = _compare(artifact, runner, state, pixels, checks, tolerance, providers, required)
    if golden:
        report.golden = str(_write_golden(artifact.path, pixels, checks))
    return report


def _runner(artifact, providers, runtime: str = "onnxruntime", mode: str = "bucketed") -> StagedRunner:
    """The dispatcher the checks run: on ONNX Runtime with the kept tokens exposed (bucketed), or on the engines
    ``tokensieve build`` wrote (no debug outputs there)."""
    if runtime != "onnxruntime":
        return artifact.staged_runner(mode, runtime, allow_truncation=True)
    stages = artifact.manifest.stages
    expose = mode == "bucketed"
    return StagedRunner(artifact.path, stages, mode=mode, allow_truncation=True, expose=expose, providers=providers)


def _compare(
    artifact,
    runner: StagedRunner,
    state: dict,
    pixels,
    checks: list[EagerCheck],
    tolerance,
    providers,
    required,
    runtime: str = "onnxruntime",
) -> ParityReport:
    """The graph side: every check's routing from stage 1's ``state`` through the artifact, against its eager side.
    On engines the kept tokens are not compared (no debug outputs), nor pad-to-max's token-level outputs (no count
    to cut them to the valid tokens)."""
    stages = artifact.manifest.stages
    layers, names = stages["sites"], [o["name"] for o in artifact.manifest.outputs]
    report = ParityReport(tolerance, len(pixels), runner.runner(stages["graphs"][""]).active)
    engines = runtime != "onnxruntime"

    def other_mode(mode: str, eager: list) -> None:
        result = _runner(artifact, providers, runtime, mode).run(pixels)
        pick = [i for i, out in enumerate(eager) if not (engines and mode == "padmax" and isinstance(out, list))]
        if pick:
            relative, ok = _relative([names[i] for i in pick], [eager[i] for i in pick], result, tolerance)
            report.checks.append(StagedCheck(f"{mode} (natural counts)", len(pixels), relative, None, ok))

    for check in checks:
        if check.mode != "bucketed":
            other_mode(check.mode, check.outputs)
            continue
        result = runner.continue_from(state if check.count is None else force_count(state, check.count))
        relative, ok = _relative(names, check.outputs, result, tolerance)
        same = None if engines else _same_kept(runner, result, check.kept, layers, required)
        if check.count is None:
            report.outputs = _output_rows(names, check.outputs, result, tolerance)
            report.checks.append(StagedCheck("bucketed (natural counts)", len(pixels), relative, same, ok, required))
            if required >= 1 and not any(r.truncated for r in result.routes):
                for mode in ("oracle", "padmax"):
                    other_mode(mode, check.outputs)
        else:
            label = f"bucket {result.routes[0].buckets[0]}, count {check.count} ({check.label})"
            report.checks.append(StagedCheck(label, len(pixels), relative, same, ok, required))
    if not report.checks:
        raise ParityError("no staged check ran")
    return report


def _output_rows(names, eager, result: StagedResult, tolerance: float) -> list[OutputParity]:
    rows = []
    for name, ref in zip(names, eager, strict=True):
        if isinstance(ref, list):
            relative, ok = _relative([name], [ref], result, tolerance)
            rows.append(OutputParity(name, float("nan"), float("nan"), relative, ok))
        else:
            rows += compare_outputs([name], [ref], {name: np.asarray(result.outputs[name])}, tolerance)
    return rows


def _write_golden(directory, pixels: np.ndarray, checks: list[EagerCheck]):
    arrays = {"pixels": pixels}
    for c, check in enumerate(checks):
        arrays[f"{c}/label"] = np.array(check.label)
        arrays[f"{c}/count"] = np.array(-1 if check.count is None else check.count)
        arrays[f"{c}/mode"] = np.array(check.mode)
        for o, output in enumerate(check.outputs):
            if isinstance(output, list):
                arrays |= {f"{c}/out/{o}/{i}": image for i, image in enumerate(output)}
            else:
                arrays[f"{c}/out/{o}"] = output
        for i, image in enumerate(check.kept):
            arrays |= {f"{c}/kept/{i}/{layer}": kept for layer, kept in image.items()}
    return write_golden(directory, save_arrays(STAGED, arrays))


def _read_golden(path, outputs: int) -> tuple[np.ndarray, list[EagerCheck]]:
    with np.load(path) as data:
        files = set(data.files)
        pixels, checks = data["pixels"], []
        for c in range(len({k.split("/")[0] for k in files} - {"pixels"})):
            images = range(len(pixels))
            values = [
                data[f"{c}/out/{o}"] if f"{c}/out/{o}" in files else [data[f"{c}/out/{o}/{i}"] for i in images]
                for o in range(outputs)
            ]
            kept = [
                {int(k.rsplit("/", 1)[1]): data[k] for k in files if k.startswith(f"{c}/kept/{i}/")} for i in images
            ]
            count, mode = int(data[f"{c}/count"]), str(data[f"{c}/mode"]) if f"{c}/mode" in files else "bucketed"
            checks.append(EagerCheck(str(data[f"{c}/label"]), None if count < 0 else count, values, kept, mode))
    return pixels, checks


def replay_staged_golden(
    artifact,
    *,
    tolerance: float = 1e-4,
    providers: list[str] | None = None,
    required: float = 1.0,
    runtime: str = "onnxruntime",
) -> ParityReport:
    """Repeat every staged check from ``DIR/golden/staged.npz`` alone (torch-free), on ONNX Runtime or on the
    engines (``runtime="tensorrt"``: outputs only)."""
    outputs = len(artifact.manifest.outputs)
    pixels, checks = read_golden(artifact, (STAGED,), lambda golden: _read_golden(golden / STAGED, outputs))
    runner = _runner(artifact, providers, runtime)
    state = runner.first_stage(pixels)
    report = _compare(artifact, runner, state, pixels, checks, tolerance, providers, required, runtime)
    report.golden, report.reference = str(artifact.path / "golden"), "golden eager outputs"
    return report
