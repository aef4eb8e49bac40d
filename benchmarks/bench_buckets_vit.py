"""Adaptive (ATP-style) pruning with static-shape buckets: bucketed latency vs the exact-count oracle (dynamic
shapes) vs pad-to-max, on a distribution of real-looking inputs.

One run per model: calibrate the threshold (target mean keep fraction) and the buckets (at most 6, exact DP) on
64 varied images, then measure per-image latency (batch 1, ONNX Runtime CPU, 2 threads) on 32 held-out images,
all modes alternating in blocks, medians of the per-block means. Writes ``benchmarks/results/buckets_vit.json``
and ``buckets_vit.png``.

Targets (issue: buckets): bucketed <= 1.10x oracle and <= 0.8x pad-to-max, with at most 6 buckets.
Pad-to-max here is the single static graph that always works: every image padded to all candidate tokens.

    python benchmarks/bench_buckets_vit.py [--models vit_small_patch16_224 vit_base_patch16_224] [--target-keep 0.5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import tokensieve
from tokensieve.bench.image import bench_staged, pyplot, save_figure
from tokensieve.calibration.data import preprocess, sample_images

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--method", default="atp()")
    parser.add_argument("--target-keep", type=float, default=0.5)
    parser.add_argument("--max-buckets", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    results: dict = {
        "method": args.method,
        "target_keep": args.target_keep,
        "max_buckets": args.max_buckets,
        "threads": args.threads,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calibration"
        calibration.mkdir()
        for i, image in enumerate(sample_images(64, seed=1)):
            image.save(calibration / f"{i:03d}.jpg")
        held_out = sample_images(32, seed=2)
        for name in args.models:
            artifact = tokensieve.export(
                f"timm:{name}",
                args.method,
                Path(tmp) / name,
                buckets="auto",
                max_buckets=args.max_buckets,
                calibrate=calibration,
                target_keep=args.target_keep,
            )
            pre = artifact.manifest.preprocessing
            data = np.stack([preprocess(im, pre["shape"], pre["mean"], pre["std"]) for im in held_out])
            report = bench_staged(artifact, data, threads=args.threads, blocks=args.blocks, save=False)
            stages = artifact.manifest.stages
            results["models"][name] = {
                **report.to_dict(),
                "calibration": stages["calibration"],
                "method": artifact.manifest.method_text,
            }
            print(f"{name}  {artifact.manifest.method_text}\n{report.text()}\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "buckets_vit.json").write_text(json.dumps(results, indent=2))
    _plot(results, RESULTS / "buckets_vit.png")
    print(f"wrote {RESULTS / 'buckets_vit.json'}")


def _plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    models = list(results["models"])
    modes = ["unreduced", "padmax", "oracle", "bucketed"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(models))
    for i, mode in enumerate(modes):
        ax.bar(x + (i - 1.5) * 0.2, [results["models"][m]["mean_ms"][mode] for m in models], 0.2, label=mode)
    ax.set_xticks(x, models, fontsize=8)
    ax.set_ylabel("ms per image (batch 1)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
