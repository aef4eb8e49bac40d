"""Latency of the reduced graph against its unreduced baseline, and the MAC-limit speedup.

Protocol (the machines are noisy and shared): both sessions are created with the same options (thread-pool
spinning off, so one session's idle threads do not busy-wait while the other runs) and warmed up; the variants then
alternate in blocks (order flipped every block) so drift hits both equally; medians are reported
with minima, and a measurement whose median exceeds its minimum by more than ``noise_ratio`` is repeated (up to
``retries`` times) and flagged if it stays noisy. ``achieved / limit`` compares the measured speedup with the
speedup the MAC counts allow.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tokensieve.errors import TokensieveError, check_at_least


@dataclass
class BenchRow:
    batch: int
    baseline_ms: float
    model_ms: float
    baseline_min_ms: float
    model_min_ms: float
    speedup: float
    limit_speedup: float
    fraction_of_limit: float
    noisy: bool
    attempts: int


@dataclass
class BenchReport:
    threads: int
    provider: list[str]
    macs_baseline: int
    macs_model: int
    rows: list[BenchRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        lines = [
            f"latency ({', '.join(self.provider)}{f', {self.threads} threads' if self.threads else ''}; medians of "
            "alternating blocks)",
            "  batch  baseline ms   model ms   speedup   MAC-limit   achieved/limit",
        ]
        for r in self.rows:
            flag = "  (noisy)" if r.noisy else ""
            lines.append(
                f"  {r.batch:>5}  {r.baseline_ms:>11.2f}  {r.model_ms:>9.2f}  {r.speedup:>7.3f}x  "
                f"{r.limit_speedup:>9.3f}x  {r.fraction_of_limit:>14.3f}{flag}"
            )
        return "\n".join(lines)


def time_alternating(runs: dict[str, callable], blocks: int, per_block: int) -> dict[str, list[float]]:
    """Call each ``runs[name]()`` ``blocks * per_block`` times, alternating variants block by block; seconds."""
    check_at_least("blocks", blocks, 1)
    check_at_least("per_block", per_block, 1)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for block in range(blocks):
        for name in names if block % 2 == 0 else reversed(names):
            fn = runs[name]
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def record_medians(rows: dict[str, dict], timings: dict[str, dict[str, list[float]]]) -> None:
    """Put each variant's median and minimum of every timed kind into its row: ``<kind>_ms``, ``<kind>_min_ms``."""
    for kind, times in timings.items():
        for name, values in times.items():
            rows[name][f"{kind}_ms"] = round(statistics.median(values) * 1e3, 2)
            rows[name][f"{kind}_min_ms"] = round(min(values) * 1e3, 2)


def bench_artifact(
    artifact,
    batches: list[int] | None = None,
    threads: int = 2,
    warmup: int = 5,
    blocks: int = 6,
    per_block: int = 5,
    noise_ratio: float = 1.15,
    retries: int = 2,
    providers: list[str] | None = None,
    save: bool = True,
    runtime: str = "onnxruntime",
) -> BenchReport:
    manifest = artifact.manifest
    if artifact.kind == "staged":
        raise TokensieveError("a staged artifact is benchmarked by bench_staged (Artifact.bench dispatches to it)")
    if manifest.graphs["model"] == manifest.graphs["baseline"]:
        raise TokensieveError("this artifact has no reduction (method none); there is nothing to compare")
    static = manifest.export["batch"]
    batches = batches or ([static] if static else [1, 8])
    if static and any(b != static for b in batches):
        raise TokensieveError(
            f"the graphs have a static batch of {static}; re-export with --batch or "
            "--dynamic-batch to benchmark other batch sizes"
        )
    options = {"threads": threads, "providers": providers, "spin": False} if runtime == "onnxruntime" else {}
    runners = {name: artifact.runner(name, runtime, **options) for name in ("baseline", "model")}
    shape = manifest.inputs[0]["shape"][1:]
    macs = manifest.macs
    threads = threads if runtime == "onnxruntime" else 0  # an engine's own scheduling
    report = BenchReport(threads, runners["model"].active, macs["baseline"], macs["model"])
    rng = np.random.default_rng(0)
    for batch in batches:
        feeds = {runners["model"].input_names[0]: rng.standard_normal((batch, *shape), dtype=np.float32)}
        runs = {name: (lambda r=runner, f=feeds: r.run(f)) for name, runner in runners.items()}
        for fn in runs.values():
            for _ in range(warmup):
                fn()
        attempts = 0
        while True:
            attempts += 1
            times = time_alternating(runs, blocks, per_block)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            low = {k: min(v) * 1e3 for k, v in times.items()}
            noisy = any(med[k] > noise_ratio * low[k] for k in med)
            if not noisy or attempts > retries:
                break
        speedup = med["baseline"] / med["model"]
        report.rows.append(
            BenchRow(
                batch,
                med["baseline"],
                med["model"],
                low["baseline"],
                low["model"],
                speedup,
                macs["limit_speedup"],
                speedup / macs["limit_speedup"],
                noisy,
                attempts,
            )
        )
    if save:
        (artifact.path / "bench.json").write_text(json.dumps(report.to_dict(), indent=2))
        plot_bench(report, artifact.path / "bench.png")
    return report


def pyplot():
    """matplotlib's pyplot on the headless Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: Path) -> None:
    """Lay out, write (120 dpi) and close a figure made with :func:`pyplot`."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_bench(report: BenchReport, path: Path) -> bool:
    """Bar chart of achieved vs MAC-limit speedup per batch; skipped (False) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = np.arange(len(report.rows))
    ax.bar(x - 0.2, [r.speedup for r in report.rows], 0.4, label="measured")
    ax.bar(x + 0.2, [r.limit_speedup for r in report.rows], 0.4, label="MAC limit")
    ax.set_xticks(x, [f"batch {r.batch}" for r in report.rows])
    ax.set_ylabel("speedup over unreduced")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.legend()
    save_figure(fig, path)
    return True


@dataclass
class StagedBenchReport:
    threads: int
    images: int
    mean_ms: dict[str, float]  # per-image latency, mean over the images, per mode
    ratios: dict[str, float]
    buckets: list[int]
    counts: dict[str, float]
    runtime: str = "onnxruntime"
    truncated: int = 0  # images above the largest bucket, run truncated in bucketed and pad-to-max modes

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        where = f"ONNX Runtime CPU, {self.threads} threads" if self.runtime == "onnxruntime" else "TensorRT engines"
        over = f"; {self.truncated} above the largest bucket, run truncated" if self.truncated else ""
        lines = [
            f"per-image latency, batch 1, {where}, mean over {self.images} images "
            f"(counts {self.counts['min']:.0f}..{self.counts['max']:.0f}, mean {self.counts['mean']:.1f}; "
            f"buckets {self.buckets}{over})"
        ]
        for mode, ms in self.mean_ms.items():
            lines.append(f"  {mode:<26} {ms:>9.2f} ms")
        lines.append("  " + ", ".join(f"{k} {v:.3f}" for k, v in self.ratios.items()))
        return "\n".join(lines)


def bench_staged(
    artifact,
    data: np.ndarray | None = None,
    threads: int = 2,
    blocks: int = 4,
    save: bool = True,
    runtime: str = "onnxruntime",
) -> StagedBenchReport:
    """Bucketed dispatch vs the exact-count oracle (dynamic shapes) vs pad-to-max vs the unreduced graph, image by
    image over a distribution of inputs (default: varied real-looking images, preprocessed like the model's), on
    ONNX Runtime or on the engines ``tokensieve build`` wrote (``runtime="tensorrt"``: the oracle is then the
    engine with one optimization profile over every bucket size)."""
    manifest = artifact.manifest
    stages = manifest.stages
    if data is None:
        from tokensieve.calibration.data import preprocess, sample_images

        pre = manifest.preprocessing
        data = np.stack([preprocess(im, pre["shape"], pre["mean"], pre["std"]) for im in sample_images(24, seed=7)])
    options = {"threads": threads, "spin": False} if runtime == "onnxruntime" else {}
    runners = {
        mode: artifact.staged_runner(mode, runtime, allow_truncation=True, **options)
        for mode in ("bucketed", "oracle", "padmax")
    }
    baseline = artifact.runner("baseline", runtime, **options)
    images = [data[i : i + 1] for i in range(len(data))]
    runs = {f"{mode}": (lambda r=runner: [r.run(x) for x in images]) for mode, runner in runners.items()}
    runs["unreduced"] = lambda: [baseline.run({baseline.input_names[0]: x}) for x in images]
    for fn in runs.values():
        fn()
    times = time_alternating(runs, blocks, 1)
    mean_ms = {mode: statistics.median(t) * 1e3 / len(images) for mode, t in times.items()}
    routes = [r for x in images for r in runners["bucketed"].run(x).routes]
    counts = [r.counts[0] for r in routes]
    report = StagedBenchReport(
        threads,
        len(images),
        mean_ms,
        {
            "bucketed/oracle": mean_ms["bucketed"] / mean_ms["oracle"],
            "bucketed/padmax": mean_ms["bucketed"] / mean_ms["padmax"],
            "bucketed/unreduced": mean_ms["bucketed"] / mean_ms["unreduced"],
        },
        stages["buckets"][""],
        {"min": float(min(counts)), "max": float(max(counts)), "mean": float(np.mean(counts))},
        runtime,
        sum(r.truncated for r in routes),
    )
    if save:
        (artifact.path / "bench.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
