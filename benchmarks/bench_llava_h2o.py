"""H2O: what eviction inside the decode graph costs per token, against the cache memory it saves.

One run: export the source three ways: unreduced with a cache for the whole ``--prompt`` + ``--new-tokens``
generation; ``a2sf(budget=B, recent=R, forgetting_factor=1)`` (H2O's prompt selection only, plain decode graph) and
``h2o(budget=B, recent=R)``, both with B + 1 slots. Then, on ONNX Runtime CPU (2 threads): the ``--prompt``-token
prefill (scoring and gathering included) and steady-state decode steps through the runtime's decoders (fixed cache
updated in place; H2O: the cache full, every step scoring, evicting and feeding its state back), variants
alternating in blocks after a warm-up; medians, minima kept to show noise. Cache memory = keys + values of every
layer, plus H2O's scores and slot positions. Writes ``benchmarks/results/llava_h2o.json`` and ``llava_h2o.png``.

    python benchmarks/bench_llava_h2o.py [--source llava-1.5-7b-shapes] [--prompt 1024] [--budget 256] [--recent 128]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np

from tokensieve.bench.image import pyplot, record_medians, save_figure, time_alternating
from tokensieve.bench.mllm import cache_bytes_per_slot, export_variants, time_prefills
from tokensieve.methods.a2sf import A2SF
from tokensieve.methods.h2o import H2O
from tokensieve.runtimes.kv_cache import FixedCacheDecoder, HeavyHitterDecoder, kv_names

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="llava-1.5-7b-shapes")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--recent", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--per-block", type=int, default=10)
    args = parser.parse_args()
    length, budget = args.prompt, args.budget
    variants = {
        "none": (None, length + args.new_tokens),
        "a2sf factor 1 (prefill only)": (A2SF(budget=budget, recent=args.recent, forgetting_factor=1), budget + 1),
        "h2o": (H2O(budget=budget, recent=args.recent), budget + 1),
    }
    rows, timings = {}, {}
    options = {"threads": args.threads, "spin": False}
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = export_variants(f"hf:{args.source}", variants, Path(tmp))
        geometry = artifacts["none"].manifest.decoder
        embeds = np.random.default_rng(0).standard_normal((1, length, geometry["hidden"]), dtype=np.float32)
        prefills, timings["prefill"] = time_prefills(artifacts, embeds, options, args.blocks, 1)
        steps = {}
        for name, artifact in artifacts.items():
            out, (method, capacity) = prefills[name], variants[name]
            present = [out[f"present_{n}"] for n in kv_names(geometry["layers"])]
            runner = artifact.runner("decode", **options)
            if isinstance(method, H2O):
                scores = out["cache_scores"]
                decode = HeavyHitterDecoder(runner, present, capacity, method, out["cache_positions"], scores)
                position = itertools.count(length)
                for _ in range(capacity - present[0].shape[2]):  # fill the cache: from here on every step evicts
                    decode.step(7, next(position))
                steps[name] = lambda d=decode, p=position: d.step(7, next(p))
            else:
                decode = FixedCacheDecoder(runner, present, capacity, offset=length - present[0].shape[2])
                steps[name] = lambda d=decode: d.step(7, length)  # rewrites the same slot: the same cost every call
            steps[name]()
            state = geometry["layers"] * geometry["kv_heads"] * capacity * (4 + 8) if isinstance(method, H2O) else 0
            cache_mb = (capacity * cache_bytes_per_slot(geometry) + state) / 2**20  # H2O: + scores, slot positions
            rows[name] = {"capacity": capacity, "cached_prompt": present[0].shape[2], "cache_mb": cache_mb}
        timings["decode"] = time_alternating(steps, args.blocks, args.per_block)
    record_medians(rows, timings)
    base = rows["none"]
    for row in rows.values():
        row["prefill_ratio"] = round(row["prefill_ms"] / base["prefill_ms"], 3)
        row["decode_ratio"] = round(row["decode_ms"] / base["decode_ms"], 3)
        row["cache_mb"] = round(row["cache_mb"], 2)
    results = {"source": args.source, "prompt_tokens": length, "budget": budget, "recent": args.recent}
    results |= {"new_tokens": args.new_tokens, "threads": args.threads, "rows": rows}
    for name, row in rows.items():
        print(
            f"{name:<30} cache {row['capacity']:>5} slots {row['cache_mb']:>7.2f} MB  prefill {row['prefill_ms']:8.1f}"
            f" ms (x{row['prefill_ratio']:.3f}, min {row['prefill_min_ms']:.1f})  decode {row['decode_ms']:7.2f} ms "
            f"(x{row['decode_ratio']:.3f}, min {row['decode_min_ms']:.2f})"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llava_h2o.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "llava_h2o.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = results["rows"]
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    x = np.arange(len(names))
    for ax, key, label in zip(
        axes, ("decode_ms", "prefill_ms", "cache_mb"), ("decode ms / token", "prefill ms", "cache MB"), strict=True
    ):
        ax.bar(x, [rows[n][key] for n in names], color=["tab:gray", "tab:blue", "tab:orange"])
        ax.set_ylabel(label)
        ax.set_xticks(x, [n.split(" (")[0] for n in names], fontsize=7)
    fig.suptitle(
        f"{results['source']}, {results['prompt_tokens']}-token prompt, budget {results['budget']} (recent "
        f"{results['recent']}), unreduced cache for {results['new_tokens']} new tokens (ORT CPU, "
        f"{results['threads']} threads)",
        fontsize=8,
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
