"""Parity of a staged (bucketed) artifact against the eager reference, which drops tokens exactly, image by image.

Checked on the same seeded inputs:

* every routing mode -- ``bucketed`` (static graph per bucket), ``oracle`` (symbolic K at the exact count) and
  ``padmax`` (one graph, padded and masked) -- gives the eager outputs on valid tokens, and the bucketed chain keeps
  the same tokens at every site;
* edge counts per first-site bucket, forced by editing stage 1's order key and count (the eager reference keeps the
  same highest-priority tokens): a count that exactly fits the bucket, one over the previous bucket's edge (the
  smallest count routed to this bucket), and the largest bucket filled.
"""

from __future__ import annotations

import numpy as np

from tokensieve.errors import ParityError
from tokensieve.graph_passes.sites.atp import KEPT_WEIGHT
from tokensieve.parity import OutputParity, ParityReport, StagedCheck, compare_outputs
from tokensieve.runtimes.buckets import StagedResult, StagedRunner


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


def _same_kept(runner: StagedRunner, result: StagedResult, records: list[dict], layers: list[int]) -> int:
    same = 0
    for i, route in enumerate(result.routes):
        ok = True
        for site, layer in enumerate(layers):
            name = f"tokensieve/site{layer}/kept"
            got = runner.exposed.get(i, {}).get(name)
            kept = min(route.counts[site], route.buckets[site])
            ref = records[i][layer]["kept"].numpy().reshape(-1)
            ok &= got is not None and np.array_equal(np.sort(got[:kept]), np.sort(ref))
        same += int(ok)
    return same


def _eager(model, pixels, forced=None):
    import torch

    with torch.no_grad():
        out = model.per_image(torch.from_numpy(pixels), forced=forced)
    out = out if isinstance(out, tuple) else (out,)
    return [[t.numpy() for t in o] if isinstance(o, list) else o.numpy() for o in out]


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


def check_staged_parity(
    artifact, eager_model, pixels: np.ndarray, tolerance: float, providers: list[str] | None
) -> ParityReport:
    manifest = artifact.manifest
    stages = manifest["stages"]
    layers, names = stages["sites"], [o["name"] for o in manifest["outputs"]]
    runner = StagedRunner(
        artifact.path, stages, mode="bucketed", allow_truncation=True, expose=True, providers=providers
    )
    report = ParityReport(tolerance, len(pixels), [])
    state = runner.first_stage(pixels)
    natural = runner.continue_from(state)
    forced = [
        {layers[s]: r.buckets[s] for s in range(len(layers)) if r.counts[s] > r.buckets[s]} for r in natural.routes
    ]
    eager = _eager(eager_model, pixels, forced)
    records = eager_model.sample_records
    report.provider = runner.runner(stages["graphs"][""]).active
    report.outputs = _output_rows(names, eager, natural, tolerance)
    relative, ok = _relative(names, eager, natural, tolerance)
    report.checks.append(
        StagedCheck(
            "bucketed (natural counts)", len(pixels), relative, _same_kept(runner, natural, records, layers), ok
        )
    )
    if not any(forced):
        for mode in ("oracle", "padmax"):
            other = StagedRunner(artifact.path, stages, mode=mode, providers=providers).run(pixels)
            relative, ok = _relative(names, eager, other, tolerance)
            report.checks.append(StagedCheck(f"{mode} (natural counts)", len(pixels), relative, None, ok))
    sizes = stages["buckets"][""]
    for index, size in enumerate(sizes):
        edges = {size: "exact fit" if index + 1 < len(sizes) else "largest bucket, full"}
        if index and sizes[index - 1] + 1 < size:
            edges[sizes[index - 1] + 1] = f"one over bucket {sizes[index - 1]}"
        for count, label in sorted(edges.items()):
            result = runner.continue_from(force_count(state, count))
            eager = _eager(eager_model, pixels, [{layers[0]: count} for _ in pixels])
            relative, ok = _relative(names, eager, result, tolerance)
            same = _same_kept(runner, result, eager_model.sample_records, layers)
            bucket = result.routes[0].buckets[0]
            report.checks.append(
                StagedCheck(f"bucket {bucket}, count {count} ({label})", len(pixels), relative, same, ok)
            )
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
