"""INT8 (QDQ) and token pruning together: latency of float32 and INT8 graphs, unpruned and pruned, on ONNX Runtime
CPU, and the INT8 artifact's drift against the float32 eager reference.

One run: export ``timm:<model>`` with ``topk(keep=K, layers=[3, 6, 9])`` and a dynamic batch, quantize it
(``tokensieve.quantize.image``: symmetric per-channel INT8 QDQ on MatMul/Gemm/Conv, the token selection in
float32) on seeded images (random weights and random data: the drift figures say what the recipe does to an
untrained network, not what a trained one loses), then time the four graphs (float32 baseline, float32 pruned, INT8
baseline, INT8 pruned) alternating in blocks after a warm-up, at batch 1 and 8, 2 threads; medians with minima.
Writes ``benchmarks/results/quantize_vit.json`` and ``quantize_vit.png``.

    python benchmarks/bench_quantize_vit.py [--model vit_base_patch16_224] [--keep 0.7]
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
from tokensieve.quantize.image import quantize_artifact

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--keep", default="0.7")
    parser.add_argument("--images", type=int, default=32, help="calibration images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--per-block", type=int, default=3)
    args = parser.parse_args()
    method = f"topk(keep={args.keep}, layers=[3, 6, 9])"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = tokensieve.export(f"timm:{args.model}", method, out=Path(tmp) / "fp32", dynamic_batch=True)
        data = rng.standard_normal((args.images, *fp32.manifest.inputs[0]["shape"][1:]), dtype=np.float32)
        int8 = quantize_artifact(fp32, data, Path(tmp) / "int8", tolerance=1.0, min_agreement=0.0)
        drift = int8.parity(batch=8, golden=False)
        options = {"threads": args.threads, "spin": False}
        runners = {
            f"{precision} {graph}": artifact.runner(graph, **options)
            for precision, artifact in (("fp32", fp32), ("int8", int8))
            for graph in ("baseline", "model")
        }
        macs = fp32.manifest.macs
        rows = {}
        for batch in (1, 8):
            feeds = {"pixel_values": rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)}
            runs = {name: (lambda r=runner, f=feeds: r.run(f)) for name, runner in runners.items()}
            for run in runs.values():
                run()
            times = time_alternating(runs, args.blocks, args.per_block)
            medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            rows[batch] = {
                name: {"median_ms": round(medians[name], 1), "min_ms": round(min(t) * 1e3, 1)}
                for name, t in times.items()
            }
            base = medians["fp32 baseline"]
            for name, row in rows[batch].items():
                row["speedup_vs_fp32_baseline"] = round(base / medians[name], 3)
            row = rows[batch]["int8 model"]
            row["pruning_speedup_in_int8"] = round(medians["int8 baseline"] / medians["int8 model"], 3)
            print(f"batch {batch}: " + ", ".join(f"{n} {r['median_ms']} ms" for n, r in rows[batch].items()))
    results = {
        "model": args.model,
        "method": method,
        "threads": args.threads,
        "mac_limit_speedup": macs["limit_speedup"],
        "drift": {
            "output_relative_error": drift.outputs[0].relative,
            "site_min_agreement": [s.min_agreement for s in drift.sites],
            "samples": drift.batch,
        },
        "rows": rows,
    }
    print(json.dumps(results["drift"]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quantize_vit.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "quantize_vit.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    names = list(results["rows"][1])
    width = 0.38
    for offset, batch in ((-width / 2, 1), (width / 2, 8)):
        values = [results["rows"][batch][n]["speedup_vs_fp32_baseline"] for n in names]
        ax.bar([i + offset for i in range(len(names))], values, width, label=f"batch {batch}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("speedup vs fp32 unpruned")
    ax.set_title(f"{results['model']}, {results['method']} (ORT CPU, {results['threads']} threads)", fontsize=8)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
