"""``tokensieve sweep``: export every strength of a method grid, evaluate and benchmark each, and chart quality
against measured latency (with the latency the MAC counts allow) to pick an operating point.

Layout of the output folder (written into a hidden sibling and renamed into place at the end, so a failed sweep
leaves nothing behind and an earlier sweep at the same place stays until the new one is complete)::

    OUT/
      sweep.json, sweep.png   the table and the Pareto chart
      0_r_4/ 1_r_8/ ...       one artifact per strength, each with its eval.json and bench.json
      baseline/               MLLMs: the unreduced artifact the strengths are compared with (unless given)

Latency: image models are timed with :func:`tokensieve.bench.image.bench_artifact` (reduced vs unreduced graph,
alternating blocks; the MAC limit is the baseline latency divided by the MAC-limit speedup), staged artifacts with
:func:`tokensieve.bench.image.bench_staged` (bucketed dispatch over the evaluation images), MLLMs by the time of a
greedy generation of ``new_tokens`` tokens over the first prompts, artifact and baseline alternating in blocks, with
no MAC limit. The Pareto front and the chart use latency relative to the unreduced model measured alongside.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokensieve.errors import ArtifactError
from tokensieve.evaluate.grid import Strength, expand_grid

SWEEP_FILE = "sweep.json"
_TIMED_PROMPTS = 4  # MLLMs: the prompts each generation-latency measurement runs


@dataclass
class SweepRow:
    label: str
    method: str
    artifact: str
    agreement: float
    accuracy_drop: float | None
    latency_ms: float
    baseline_ms: float
    limit_ms: float | None  # the latency the MAC counts allow (None: MLLMs)
    pareto: bool = False
    metrics: dict[str, float | None] = field(default_factory=dict)  # the evaluation's other figures

    @property
    def relative(self) -> float:
        """Latency as a fraction of the unreduced model's, both measured together (drift hits both alike)."""
        return self.latency_ms / self.baseline_ms

    @property
    def limit_relative(self) -> float | None:
        return None if self.limit_ms is None else self.limit_ms / self.baseline_ms


@dataclass
class SweepReport:
    source: str
    grid: str
    task: str
    unit: str  # what latency_ms measures
    rows: list[SweepRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for row, data in zip(self.rows, out["rows"], strict=True):
            data.update(relative=row.relative, limit_relative=row.limit_relative)
        return out

    def text(self) -> str:
        lines = [
            f"{self.source} {self.grid}: task {self.task}, latency {self.unit}",
            f"  {'strength':<14} {'agreement':>9} {'acc drop':>9} {'ms':>9} {'baseline':>9} {'relative':>8} "
            f"{'MAC limit':>9}  pareto",
        ]
        for r in self.rows:
            drop = "-" if r.accuracy_drop is None else f"{r.accuracy_drop:+.4f}"
            limit = "-" if r.limit_ms is None else f"{r.limit_ms:.2f}"
            lines.append(
                f"  {r.label:<14} {r.agreement:>9.4f} {drop:>9} {r.latency_ms:>9.2f} {r.baseline_ms:>9.2f} "
                f"{r.relative:>8.3f} {limit:>9}  {'*' if r.pareto else ''}"
            )
        return "\n".join(lines)


def mark_pareto(rows: list[SweepRow]) -> None:
    """Flag the rows no other row beats on both relative latency (lower) and agreement (higher): latency relative to
    the unreduced model measured alongside, so that a shared machine's drift between strengths does not decide."""
    for r in rows:
        r.pareto = not any(
            o is not r
            and o.relative <= r.relative
            and o.agreement >= r.agreement
            and (o.relative < r.relative or o.agreement > r.agreement)
            for o in rows
        )


def _folder(index: int, strength: Strength) -> str:
    return f"{index}_{re.sub(r'[^A-Za-z0-9.]+', '_', strength.label).strip('_')}"


def _generation_ms(artifact, baseline, data, bench: dict[str, Any], new_tokens: int) -> tuple[float, float]:
    """Mean ms of one greedy generation of ``new_tokens`` tokens (EOS ignored, so both make as many) over the first
    prompts, the artifact and the baseline alternating in blocks (medians)."""
    import statistics

    from tokensieve.bench.image import time_alternating
    from tokensieve.evaluate.data import read_prompts

    cases = read_prompts(data, limit=_TIMED_PROMPTS)
    options = {"spin": False, "threads": bench["threads"]}
    runners = {"model": artifact.llava_runner(**options), "baseline": baseline.llava_runner(**options)}
    runs = {
        key: (lambda r=runner: [r.generate(c.image, c.prompt, new_tokens, ignore_eos=True) for c in cases])
        for key, runner in runners.items()
    }
    for run in runs.values():
        run()
    times = time_alternating(runs, bench["blocks"], bench["per_block"])
    model, base = (statistics.median(times[key]) * 1e3 / len(cases) for key in ("model", "baseline"))
    return model, base


def _latency(artifact, baseline, data, bench: dict[str, Any], new_tokens: int) -> tuple[float, float, float | None]:
    """``(latency ms, baseline ms, MAC-limit ms)`` of one strength (see the module docstring)."""
    if artifact.kind == "mllm":
        return (*_generation_ms(artifact, baseline, data, bench, new_tokens), None)
    from tokensieve.bench.image import bench_artifact, bench_staged

    if artifact.kind == "staged":
        from tokensieve.evaluate.data import image_set, load_pixels

        images = image_set(data, artifact.manifest.preprocessing, limit=8)
        pixels = load_pixels(images, 0, len(images), artifact.manifest.preprocessing)
        staged = bench_staged(artifact, pixels, threads=bench["threads"], blocks=bench["blocks"])
        macs = artifact.manifest.macs
        unreduced = staged.mean_ms["unreduced"]
        expected = macs.get("expected") or macs["model"]  # the bucketed mean over the calibration data, if recorded
        return staged.mean_ms["bucketed"], unreduced, unreduced * expected / macs["baseline"]
    row = bench_artifact(artifact, warmup=2, **bench).rows[0]
    return row.model_ms, row.baseline_ms, row.baseline_ms / row.limit_speedup


def check_data(data: str | os.PathLike, limit: int | None) -> None:
    """Read the evaluation data's listing (a JSONL file: every line) before anything is exported."""
    from tokensieve.evaluate.data import image_set, read_prompts

    if Path(data).suffix in (".jsonl", ".json"):
        read_prompts(data, limit)
    elif Path(data).suffix != ".npz":
        image_set(data, {}, limit)


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / SWEEP_FILE).is_file())):
        raise ArtifactError(f"{out} exists and is not a tokensieve sweep; choose another --out or remove it")


def sweep(
    source: str,
    method: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    baseline=None,
    task: str | None = None,
    limit: int | None = None,
    new_tokens: int = 16,
    threads: int = 2,
    blocks: int = 3,
    per_block: int = 3,
    quiet: bool = True,
    **export_options: Any,
) -> SweepReport:
    """Export ``source`` at every strength of the grid ``method`` into ``out``, evaluate each on ``data`` and time it;
    writes ``sweep.json`` and ``sweep.png`` there. ``baseline``: an unreduced MLLM artifact (exported otherwise)."""
    from tqdm import tqdm

    from tokensieve.artifact.store import replaced_directory
    from tokensieve.evaluate import evaluate
    from tokensieve.exporter.dispatch import export

    strengths = expand_grid(method)
    out = Path(out).absolute()
    _check_out(out)
    check_data(data, limit)
    bar = {"disable": quiet, "leave": False}
    with replaced_directory(out, "; choose a writable --out") as staging:
        artifacts = [
            export(source, s.method, staging / _folder(i, s), **export_options)
            for i, s in enumerate(tqdm(strengths, desc="export", unit="strength", **bar))
        ]
        if artifacts[0].kind == "mllm" and baseline is None:
            baseline = export(source, "none", staging / "baseline", **export_options)
        options = {"task": task, "limit": limit, "new_tokens": new_tokens, "save": False}
        qualities = [
            evaluate(a, data, baseline, **options) for a in tqdm(artifacts, desc="eval", unit="artifact", **bar)
        ]
        pairs = list(zip(artifacts, qualities, strict=True))
        bench = {"threads": threads, "blocks": blocks, "per_block": per_block}
        timings = [
            _latency(a, baseline, data, bench, new_tokens)
            for a in tqdm(artifacts, desc="bench", unit="artifact", **bar)
        ]
        report = SweepReport(source, " ".join(method.split()), qualities[0].task, "")
        for strength, (artifact, quality), timing in zip(strengths, pairs, timings, strict=True):
            quality.artifact = str(out / artifact.path.name)
            quality.save(artifact.path)
            quality_row = (quality.agreement, quality.accuracy_drop)
            row = SweepRow(strength.label, strength.method, artifact.path.name, *quality_row, *timing)
            row.metrics = quality.metrics
            report.rows.append(row)
        report.unit = "ms per generation" if artifacts[0].kind == "mllm" else "ms per image batch"
        mark_pareto(report.rows)
        (staging / SWEEP_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        plot_sweep(report, staging / "sweep.png")
    return report


def plot_sweep(report: SweepReport, path: Path) -> bool:
    """Quality vs latency: measured points (Pareto front joined), MAC-limit points, the unreduced baseline;
    skipped (False) without matplotlib."""
    from tokensieve.bench.image import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = report.rows
    ax.plot([r.relative for r in rows], [r.agreement for r in rows], "o", color="C0", label="measured")
    front = sorted((r for r in rows if r.pareto), key=lambda r: r.relative)
    ax.plot([r.relative for r in front], [r.agreement for r in front], "-", color="C0", alpha=0.5)
    for r in rows:
        ax.annotate(r.label, (r.relative, r.agreement), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if r.limit_relative is not None:
            ax.plot([r.limit_relative, r.relative], [r.agreement] * 2, ":", color="gray", lw=0.8)
    limits = [r for r in rows if r.limit_relative is not None]
    if limits:
        x, y = [r.limit_relative for r in limits], [r.agreement for r in limits]
        ax.plot(x, y, "o", mfc="none", color="C1", label="MAC limit")
    ax.plot([1.0], [1.0], "*", color="k", ms=10, label="unreduced")
    ax.set_xlabel(f"latency / unreduced latency ({report.unit}, measured together)")
    ax.set_ylabel(
        {"classify": "top-1 agreement", "embed": "cosine", "dense": "map correlation"}.get(
            report.task, "greedy-token agreement"
        )
    )
    ax.set_title(f"{report.source} {report.grid}", fontsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True
