"""SnapKV: what compressing the prompt cache costs in prefill and buys in decode latency and cache memory.

One run: export the source unreduced and with ``snapkv(budget=B, window=W)`` for each B; each artifact's
fixed-capacity decode graph holds exactly what a ``--new-tokens`` generation needs (unreduced: prompt + new tokens;
SnapKV: B + new tokens, the point of the method on a static-shape engine). Then, on ONNX Runtime CPU (2 threads), a
``--prompt``-token prefill (scoring and gathering included) and one decode step right after the prompt, with the
fixed cache updated in place as the runtime does and with the growing cache; variants alternate in blocks after a
warm-up; medians (minima kept to show noise). Cache memory = keys + values of every layer in the fixed graph.
Writes ``benchmarks/results/llava_snapkv.json`` and ``llava_snapkv.png``.

    python benchmarks/bench_llava_snapkv.py [--source llava-1.5-7b-shapes] [--prompt 1024] [--budgets 256 512]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import numpy as np

from tokensieve.bench.image import pyplot, record_medians, save_figure, time_alternating
from tokensieve.bench.mllm import cache_bytes_per_slot, export_variants, time_prefills
from tokensieve.methods.snapkv import SnapKV
from tokensieve.runtimes.kv_cache import FixedCacheDecoder, kv_names

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="llava-1.5-7b-shapes")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--per-block", type=int, default=2)
    args = parser.parse_args()
    length = args.prompt
    variants = {"none": (None, length + args.new_tokens)}
    for budget in args.budgets:
        variants[f"snapkv budget={budget}"] = (SnapKV(budget=budget, window=args.window), budget + args.new_tokens)
    options = {"threads": args.threads, "spin": False}
    rows, timings = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = export_variants(f"hf:{args.source}", variants, Path(tmp))
        decoder = artifacts["none"].manifest.decoder
        names = kv_names(decoder["layers"])
        embeds = np.random.default_rng(0).standard_normal((1, length, decoder["hidden"]), dtype=np.float32)
        prefills, timings["prefill"] = time_prefills(artifacts, embeds, options, args.blocks, args.per_block)
        presents = {name: [out[f"present_{n}"] for n in names] for name, out in prefills.items()}
        for name, present in presents.items():
            capacity, cached = variants[name][1], present[0].shape[2]
            cache_mb = capacity * cache_bytes_per_slot(decoder) / 2**20
            rows[name] = {"capacity": capacity, "cached_prompt": cached, "cache_mb": cache_mb}
        runs = {}
        for name, artifact in artifacts.items():
            present, capacity = presents[name], variants[name][1]
            offset = length - rows[name]["cached_prompt"]
            steps = FixedCacheDecoder(artifact.runner("decode", **options), present, capacity, offset=offset)
            runs[name] = lambda d=steps: d.step(7, length)  # rewrites the same slot: the same cost every call
            runs[name]()
        timings["decode_fixed"] = time_alternating(runs, args.blocks, 5 * args.per_block)
        del runs, steps
        gc.collect()
        runs = {}
        for name, artifact in artifacts.items():
            feeds = {"input_ids": np.array([[7]]), "position_ids": np.array([[length]])}
            feeds |= {f"past_{n}": t for n, t in zip(names, presents[name], strict=True)}
            step = artifact.runner("decode_growing", **options)
            runs[name] = lambda r=step, f=feeds: r.run(f)
            runs[name]()
        timings["decode_growing"] = time_alternating(runs, args.blocks, 5 * args.per_block)
    record_medians(rows, timings)
    base = rows["none"]
    for row in rows.values():
        row["prefill_ratio"] = round(row["prefill_ms"] / base["prefill_ms"], 3)
        row["decode_fixed_speedup"] = round(base["decode_fixed_ms"] / row["decode_fixed_ms"], 3)
        row["decode_growing_speedup"] = round(base["decode_growing_ms"] / row["decode_growing_ms"], 3)
        row["cache_mb"] = round(row["cache_mb"], 1)
    results = {"source": args.source, "prompt_tokens": length, "window": args.window, "threads": args.threads}
    results |= {"new_tokens": args.new_tokens, "rows": rows}
    for name, row in rows.items():
        print(
            f"{name:<20} cache {row['capacity']:>5} slots {row['cache_mb']:>7.1f} MB  prefill {row['prefill_ms']:8.1f} "
            f"ms (x{row['prefill_ratio']:.3f})  decode fixed {row['decode_fixed_ms']:7.2f} ms "
            f"(min {row['decode_fixed_min_ms']:.2f}, {row['decode_fixed_speedup']:.2f}x)  growing "
            f"{row['decode_growing_ms']:7.2f} ms ({row['decode_growing_speedup']:.2f}x)"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llava_snapkv.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "llava_snapkv.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = results["rows"]
    names = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.4))
    x = np.arange(len(names))
    left.bar(x - 0.2, [rows[n]["decode_fixed_ms"] for n in names], 0.4, label="fixed cache (in place)")
    left.bar(x + 0.2, [rows[n]["decode_growing_ms"] for n in names], 0.4, label="growing cache")
    left.set_ylabel("decode ms / token")
    left.legend(fontsize=7)
    right.bar(x, [rows[n]["prefill_ms"] for n in names], color="tab:gray")
    right.set_ylabel("prefill ms (scoring included)")
    for ax in (left, right):
        ax.set_xticks(x, [n.replace("snapkv ", "") for n in names], fontsize=7)
    fig.suptitle(
        f"{results['source']}, {results['prompt_tokens']}-token prompt, SnapKV window {results['window']} "
        f"(ORT CPU, {results['threads']} threads)",
        fontsize=8,
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
