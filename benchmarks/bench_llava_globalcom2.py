"""GlobalCom² on LLaVA-NeXT: image tokens, host selection cost, and prefill latency against the MAC-limit speedup,
with and without the method.

One run: export the source once with ``globalcom2`` (fixed-cache decode only; the graphs do not depend on the
retention, and the vision graph's ``image_features`` output is the unreduced one), then for each image size time, on
ONNX Runtime CPU (2 threads): the vision graph (shared by every variant), each variant's host step (AnyRes packing
for "none", GlobalCom²'s selection for each retention R), and the prefill graph on a LLaVA-shaped prompt of each
variant's length: 36 tokens before the image (BOS + system prompt), the image tokens, 24 question tokens. Variants
alternate in blocks after a warm-up; medians (minima kept to show noise). The MAC limit counts the decoder's matrix
products for the prompt each variant prefills (:func:`tokensieve.plan.mllm.prefill_macs`). Writes
``benchmarks/results/llava_globalcom2.json`` and ``.png``.

    python benchmarks/bench_llava_globalcom2.py [--source llava-next-7b-shapes] [--retention 0.25 0.1]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
from bench_llava_fastv import QUESTION, SYSTEM

import tokensieve
from tokensieve.bench.image import pyplot, save_figure, time_alternating
from tokensieve.methods.globalcom2 import GlobalCom2
from tokensieve.plan.mllm import prefill_macs
from tokensieve.runtimes.globalcom2 import select_features
from tokensieve.runtimes.image_families import pack_features, preprocess
from tokensieve.runtimes.prefill import prefill_feeds

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="llava-next-7b-shapes")
    parser.add_argument("--retention", nargs="+", default=["0.25", "0.1"])
    parser.add_argument("--sizes", nargs="+", default=["672x672", "480x640"], help="image HEIGHTxWIDTH")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--per-block", type=int, default=1)
    args = parser.parse_args()
    methods = {f"globalcom2 {r}": GlobalCom2(retention=Fraction(r)) for r in args.retention}
    rng = np.random.default_rng(0)
    results = {"source": args.source, "threads": args.threads, "images": {}}
    with tempfile.TemporaryDirectory() as tmp:
        artifact = tokensieve.export(
            f"hf:{args.source}", "globalcom2()", out=Path(tmp) / "a", growing_cache=False, capacity=8
        )
        gc.collect()
        manifest, host = artifact.manifest, artifact.manifest.host
        newline = np.load(artifact.path / "image_newline.npy")
        vision = artifact.runner("vision", threads=args.threads, spin=False)
        prefill = artifact.runner("prefill", threads=args.threads, spin=False)
        for text in args.sizes:
            height, width = map(int, text.split("x"))
            pixels, size = preprocess(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), host)
            out = vision.run({"pixel_values": pixels})
            features, scores = out["image_features"], out["cls_scores"]
            steps = {"none": lambda f=features, s=size: pack_features(f, s, host, newline)}
            for name, method in methods.items():
                steps[name] = lambda f=features, c=scores, s=size, m=method: select_features(f, c, s, host, newline, m)[
                    0
                ]
            tokens, prefill_runs = {}, {}
            for name, step in steps.items():
                tokens[name] = len(step())
                length = SYSTEM + tokens[name] + QUESTION
                embeds = rng.standard_normal((1, length, manifest.decoder["hidden"]), dtype=np.float32)
                feeds = prefill_feeds(prefill, embeds, (SYSTEM, SYSTEM + tokens[name]))
                prefill_runs[name] = lambda f=feeds: prefill.run(f)
                prefill_runs[name]()  # warm-up
            vision_ms = time_alternating({"vision": lambda p=pixels: vision.run({"pixel_values": p})}, args.blocks, 1)
            host_times = time_alternating(steps, args.blocks, 5)
            prefill_times = time_alternating(prefill_runs, args.blocks, args.per_block)
            results["images"][text] = {
                "vision_ms": round(statistics.median(vision_ms["vision"]) * 1e3, 1),
                "rows": _rows(tokens, host_times, prefill_times, manifest.decoder),
            }
    _report(results)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llava_globalcom2.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "llava_globalcom2.png")


def _rows(tokens: dict, host: dict, prefill: dict, decoder: dict) -> dict:
    def macs(name: str) -> int:
        return prefill_macs(decoder, [SYSTEM + tokens[name] + QUESTION] * decoder["layers"])

    rows = {}
    for name in tokens:
        rows[name] = {
            "image_tokens": tokens[name],
            "host_ms": round(statistics.median(host[name]) * 1e3, 2),
            "prefill_ms": round(statistics.median(prefill[name]) * 1e3, 1),
            "prefill_min_ms": round(min(prefill[name]) * 1e3, 1),
            "prefill_gmacs": round(macs(name) / 1e9, 1),
            "mac_limit_speedup": round(macs("none") / macs(name), 3),
        }
    for row in rows.values():
        row["prefill_speedup"] = round(rows["none"]["prefill_ms"] / row["prefill_ms"], 3)
        row["fraction_of_limit"] = round(row["prefill_speedup"] / row["mac_limit_speedup"], 3)
    return rows


def _report(results: dict) -> None:
    for size, image in results["images"].items():
        print(f"{size:>9} vision graph {image['vision_ms']:.1f} ms (every variant)")
        for name, r in image["rows"].items():
            print(
                f"{size:>9} {name:<16} {r['image_tokens']:5d} image tokens  host {r['host_ms']:6.2f} ms  "
                f"prefill {r['prefill_ms']:8.1f} ms (min {r['prefill_min_ms']:.1f})  {r['prefill_speedup']:.2f}x of "
                f"limit {r['mac_limit_speedup']:.2f}x ({r['fraction_of_limit']:.2f})"
            )


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(results["images"]), figsize=(5.5 * len(results["images"]), 3.4), squeeze=False)
    for ax, (size, image) in zip(axes[0], results["images"].items(), strict=True):
        rows = image["rows"]
        names = list(rows)
        ax.bar(names, [rows[n]["prefill_speedup"] for n in names], label="measured")
        ax.plot(names, [rows[n]["mac_limit_speedup"] for n in names], "kD", label="MAC limit")
        ax.set_ylabel("prefill speedup vs unreduced")
        tokens = ", ".join(str(rows[n]["image_tokens"]) for n in names)
        ax.set_title(f"{results['source']} {size}: image tokens {tokens}", fontsize=8)
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
