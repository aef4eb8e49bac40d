"""MLLM decode: per-token latency vs context length for the fixed-capacity and the growing KV cache, prefill
latency, vision latency and export time.

One run per source: export (timed per graph), then ``tokensieve.bench.mllm.bench_llava`` on ONNX Runtime CPU
(2 threads): the fixed and growing decode graphs alternate in blocks at each context length; medians. The default
sources are LLaVA-1.5-7B layer shapes (hidden 4096, 32 heads, head dim 128, vocab 32064; 2 vision and 2 text
layers, random weights) and the tiny preset. Writes ``benchmarks/results/llava_decode.json`` and
``llava_decode.png``.

    python benchmarks/bench_llava_decode.py [--sources llava-1.5-7b-shapes llava-tiny] [--capacity 2048]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import tokensieve
from tokensieve.bench.image import pyplot, save_figure

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=["llava-1.5-7b-shapes", "llava-tiny"])
    parser.add_argument("--capacity", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--per-block", type=int, default=5)
    args = parser.parse_args()
    results: dict = {"capacity": args.capacity, "threads": args.threads, "sources": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for source in args.sources:
            start = time.perf_counter()
            artifact = tokensieve.export(f"hf:{source}", out=Path(tmp) / source, capacity=args.capacity)
            total = time.perf_counter() - start
            report = artifact.bench(threads=args.threads, blocks=args.blocks, per_block=args.per_block, save=False)
            print(report.text())
            print(f"export total (build, 5 graphs, save, check): {total:.1f} s\n")
            results["sources"][source] = {**report.to_dict(), "export_total_seconds": round(total, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llava_decode.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "llava_decode.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    sources = results["sources"]
    fig, axes = plt.subplots(1, len(sources), figsize=(5.2 * len(sources), 3.6), squeeze=False)
    for ax, (source, r) in zip(axes[0], sources.items(), strict=True):
        x = [row["context"] for row in r["decode"]]
        ax.plot(x, [row["fixed_ms"] for row in r["decode"]], "o-", label=f"fixed cache ({r['capacity']} slots)")
        ax.plot(x, [row["growing_ms"] for row in r["decode"]], "s-", label="growing cache")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_ylabel("decode ms / token")
        ax.set_title(f"{source} (ORT CPU, {results['threads']} threads)", fontsize=9)
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
