"""INT8 (QDQ) together with static-shape buckets: per-image latency of a float32 and an INT8 staged (ATP) artifact on
ONNX Runtime CPU, against the unreduced graphs, and how the INT8 stage 1 routes compared with the float32 one.

One run: export ``timm:<model>`` with ``atp()``, the threshold (target mean keep fraction) and at most 6 buckets
calibrated on 64 varied images, quantize it (every stage graph calibrated on its own inputs) on 32 of them, then,
over 24 held-out images at batch 1 and 2 threads, time float32 unreduced, float32 bucketed, INT8 unreduced, INT8
bucketed and INT8 pad-to-max, alternating in blocks after a warm-up; medians of the per-block means. The routing
figures compare each held-out image's first-site count and bucket under INT8 with float32. Random weights: the
drift says what the recipe does to an untrained network, not what a trained one loses. Writes
``benchmarks/results/quantize_buckets.json`` and ``quantize_buckets.png``.

    python benchmarks/bench_quantize_buckets.py [--model vit_small_patch16_224] [--target-keep 0.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

import tokensieve
from tokensieve.bench.image import pyplot, save_figure, time_alternating
from tokensieve.calibration.data import preprocess, sample_images

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--target-keep", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calibration"
        calibration.mkdir()
        pictures = sample_images(64, seed=1)
        for i, image in enumerate(pictures):
            image.save(calibration / f"{i:03d}.jpg")
        fp32 = tokensieve.export(
            f"timm:{args.model}",
            "atp()",
            Path(tmp) / "fp32",
            buckets="auto",
            calibrate=calibration,
            target_keep=args.target_keep,
            dynamic_batch=True,
        )
        pre = fp32.manifest.preprocessing

        def pixels(image):
            return preprocess(image, pre["shape"], pre["mean"], pre["std"])

        int8 = fp32.quantize(
            np.stack([pixels(im) for im in pictures[:32]]), Path(tmp) / "int8", tolerance=1.0, min_agreement=0.0
        )
        drift = int8.parity(golden=False)
        held_out = [pixels(im)[None] for im in sample_images(24, seed=2)]
        options = {"threads": args.threads, "spin": False}
        staged = {
            "fp32 bucketed": fp32.staged_runner("bucketed", allow_truncation=True, **options),
            "int8 bucketed": int8.staged_runner("bucketed", allow_truncation=True, **options),
            "int8 padmax": int8.staged_runner("padmax", **options),
        }
        plain = {
            f"{name} unreduced": artifact.runner("baseline", **options)
            for name, artifact in (("fp32", fp32), ("int8", int8))
        }
        runs = {name: (lambda r=runner: [r.run(x) for x in held_out]) for name, runner in staged.items()}
        runs |= {
            name: (lambda r=runner: [r.run({r.input_names[0]: x}) for x in held_out]) for name, runner in plain.items()
        }
        for run in runs.values():
            run()
        times = time_alternating(runs, args.blocks, 1)
        ms = {name: statistics.median(t) * 1e3 / len(held_out) for name, t in times.items()}
        routes = {name: [staged[f"{name} bucketed"].run(x).routes[0] for x in held_out] for name in ("fp32", "int8")}
        counts = {name: np.array([r.counts[0] for r in rs]) for name, rs in routes.items()}
        same_bucket = np.mean(
            [a.buckets[0] == b.buckets[0] for a, b in zip(routes["fp32"], routes["int8"], strict=True)]
        )
        results = {
            "model": args.model,
            "method": fp32.manifest.method_text,
            "buckets": fp32.manifest.stages["buckets"][""],
            "threads": args.threads,
            "images": len(held_out),
            "mean_ms": {name: round(v, 2) for name, v in ms.items()},
            "ratios": {
                f"int8 bucketed / {other}": round(ms["int8 bucketed"] / ms[other], 3)
                for other in ("fp32 bucketed", "fp32 unreduced", "int8 unreduced", "int8 padmax")
            },
            "routing": {
                "fp32_mean_count": float(counts["fp32"].mean()),
                "int8_mean_count": float(counts["int8"].mean()),
                "max_abs_count_difference": int(np.abs(counts["fp32"] - counts["int8"]).max()),
                "same_bucket_share": float(same_bucket),
            },
            "drift": {
                "output_relative_error": drift.outputs[0].relative,
                "checks": {c.label: c.relative for c in drift.checks},
            },
        }
    report(results)


def report(results: dict) -> None:
    """Print the figures and write the JSON and the PNG."""
    for name, value in results["mean_ms"].items():
        print(f"  {name:<18} {value:>9.2f} ms per image")
    print(json.dumps({k: results[k] for k in ("ratios", "routing", "drift")}, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantize_buckets.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "quantize_buckets.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    names = list(results["mean_ms"])
    ax.bar(range(len(names)), [results["mean_ms"][n] for n in names])
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel("ms per image (batch 1)")
    ax.set_title(f"{results['model']}, {results['method']} (ORT CPU, {results['threads']} threads)", fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
