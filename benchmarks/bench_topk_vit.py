"""Unpruned vs top-k-pruned ViT latency on ONNX Runtime CPU, against the MAC-limit speedup.

One run measures every (model, batch) pair with the same protocol as ``tokensieve bench``: both graphs warmed up,
variants alternating in blocks, medians (and minima) reported, noisy measurements repeated. Writes
``benchmarks/results/topk_vit.json`` and ``topk_vit.png``.

Target (issue: spine): batch 8, vit_base_patch16_224, keep 0.7 at blocks 3/6/9: achieved >= 0.97 of the limit.

    python benchmarks/bench_topk_vit.py [--models vit_base_patch16_224 vit_small_patch16_224] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import tokensieve
from tokensieve.bench.image import BenchReport, plot_bench

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "vit_small_patch16_224"])
    parser.add_argument("--method", default="topk(keep=0.7, layers=[3,6,9])")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--per-block", type=int, default=5)
    args = parser.parse_args()

    RESULTS.mkdir(exist_ok=True)
    results = {
        "method": args.method,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            artifact = tokensieve.export(f"timm:{name}", args.method, Path(tmp) / name, dynamic_batch=True)
            report: BenchReport = artifact.bench(
                batches=args.batches, threads=args.threads, blocks=args.blocks, per_block=args.per_block, save=False
            )
            print(f"{name}  {args.method}\n{report.text()}\n")
            results["models"][name] = report.to_dict()
            plot_bench(report, RESULTS / f"topk_{name}.png")
    (RESULTS / "topk_vit.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS / 'topk_vit.json'}")


if __name__ == "__main__":
    main()
