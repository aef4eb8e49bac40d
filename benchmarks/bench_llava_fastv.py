"""FastV prefill: latency of the exported prefill graph with and without FastV, against the MAC-limit speedup.

One run: export the source unreduced and with ``fastv(k=K, keep=R)`` for each R (fixed-cache decode only), then
time the prefill graphs on ONNX Runtime CPU (2 threads) on a LLaVA-1.5-shaped prompt: BOS, 35 system tokens, the
image tokens, 24 question tokens (the image span starts at 36, as in FastV's scripts). Variants alternate in blocks
after a warm-up; medians (minima kept to show noise). The MAC limit counts the decoder's matrix products per layer
(projections, MLP, ``Q·Kᵀ`` and ``P·V`` over the full ``T × T`` the graph computes, the last-position LM head) for
the sequence each layer sees. Writes ``benchmarks/results/llava_fastv.json`` and ``llava_fastv.png``.

    python benchmarks/bench_llava_fastv.py [--source llava-1.5-7b-shapes] [--k 1] [--keep 0.5 0.25]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

import tokensieve
from tokensieve.bench.image import pyplot, save_figure, time_alternating
from tokensieve.methods.fastv import FastV
from tokensieve.plan.mllm import prefill_macs
from tokensieve.runtimes.prefill import Prefill

RESULTS = Path(__file__).parent / "results"
SYSTEM, QUESTION = 36, 24  # tokens before the image (BOS + system prompt) and after it


def bench_cut_prefill(source: str, methods: dict, threads: int, blocks: int, per_block: int) -> dict:
    """Export ``source`` once per variant (``name: method`` with a decoder cut ``k``, or ``None``), time each
    prefill on the same prompt (variants alternating in blocks) and compare with the MAC limit. The prefill is
    :class:`tokensieve.runtimes.prefill.Prefill`: FastV's one graph, or ATP-LLaVA's segments and host decisions."""
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {
            name: tokensieve.export(f"hf:{source}", method, out=Path(tmp) / str(i), capacity=1024, growing_cache=False)
            for i, (name, method) in enumerate(methods.items())
        }
        manifest = artifacts["none"].manifest
        decoder = manifest.decoder
        image = manifest.image_tokens["count"]
        length = SYSTEM + image + QUESTION
        embeds = np.random.default_rng(0).standard_normal((1, length, decoder["hidden"]), dtype=np.float32)
        runs, per_layer = {}, {}
        for name, artifact in artifacts.items():
            prefill = Prefill.from_artifact(artifact, threads=threads, spin=False)
            _, _, extras = prefill(embeds, (SYSTEM, SYSTEM + image))  # warm-up
            counts = [length, *(len(c) for c in extras.get("cut_positions", []))]
            cuts = methods[name].cuts if methods[name] else ()
            per_layer[name] = [counts[sum(i >= k for k in cuts)] for i in range(decoder["layers"])]
            runs[name] = lambda p=prefill: p(embeds, (SYSTEM, SYSTEM + image))
        times = time_alternating(runs, blocks, per_block)
    rows = {}
    full = prefill_macs(decoder, [length] * decoder["layers"])
    for name in methods:
        lengths = per_layer[name]
        rows[name] = {
            "tokens_per_layer": lengths,
            "median_ms": round(statistics.median(times[name]) * 1e3, 1),
            "min_ms": round(min(times[name]) * 1e3, 1),
            "gmacs": round(prefill_macs(decoder, lengths) / 1e9, 2),
            "mac_limit_speedup": round(full / prefill_macs(decoder, lengths), 3),
        }
    base = rows["none"]["median_ms"]
    for row in rows.values():
        row["speedup"] = round(base / row["median_ms"], 3)
        row["fraction_of_limit"] = round(row["speedup"] / row["mac_limit_speedup"], 3)
    for name, row in rows.items():
        print(
            f"{name:<24} tokens/layer {row['tokens_per_layer']}  {row['median_ms']:8.1f} ms (min {row['min_ms']:.1f})"
            f"  {row['speedup']:.3f}x of limit {row['mac_limit_speedup']:.3f}x ({row['fraction_of_limit']:.2f})"
        )
    return {"source": source, "prompt_tokens": length, "image_tokens": image, "rows": rows, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="llava-1.5-7b-shapes")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--keep", nargs="+", default=["0.5", "0.25"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--per-block", type=int, default=2)
    args = parser.parse_args()
    methods = {"none": None, **{f"fastv keep={r}": FastV(k=args.k, keep=Fraction(r)) for r in args.keep}}
    results = {"k": args.k, **bench_cut_prefill(args.source, methods, args.threads, args.blocks, args.per_block)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llava_fastv.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "llava_fastv.png", f"FastV k={args.k}")


def plot(results: dict, path: Path, method: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    names = list(rows)
    ax.bar(names, [rows[n]["speedup"] for n in names], label="measured")
    ax.plot(names, [rows[n]["mac_limit_speedup"] for n in names], "kD", label="MAC limit")
    ax.set_ylabel("prefill speedup vs unreduced")
    ax.set_title(
        f"{results['source']}, {method}, {results['prompt_tokens']} tokens (ORT CPU, {results['threads']} threads)",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
