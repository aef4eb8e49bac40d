"""Unmerged vs merged ViT latency on ONNX Runtime CPU: tokensieve's merge graphs against the MAC-limit speedup and
against the "naive route" (the same eager ToMe code exported straight with torch.onnx).

One run measures every variant of a batch size together: all sessions (thread-pool spinning off, so idle sessions
do not steal the cores) warmed up, then alternating in blocks (order rotated every block), medians (and minima)
reported, the whole batch size re-measured when a median exceeds its minimum by more than 15 % (flagged "noisy" if
it still does after three attempts). Writes ``benchmarks/results/merge_vit.json`` and ``merge_vit.png`` (``--out``
names other files). Pruning runs next to merging at the same blocks: top-k and Zero-TPrune at keep 0.7.

Targets (issue: token merging): batch 8, vit_small_patch16_224: ToMe r=16 >= 0.95 of its MAC-limit speedup,
r=8 >= 0.93.

The naive route exports :class:`tokensieve.reference.reduce.ReducedModel` with ``torch.onnx.export(dynamo=True)``;
its stable sort (not exportable) is swapped for ``argsort(descending=True)``, what ToMe's own code calls. That
graph merges with ``ScatterElements(reduction='add')`` (TensorRT-unfriendly) and is timed as exported. With
``--official-tome DIR`` (a checkout of facebookresearch/ToMe, never vendored: CC-BY-NC) the official timm patch on
the same model is exported and timed too.

    python benchmarks/bench_merge_vit.py [--model vit_small_patch16_224] [--batches 1 8] [--threads 2]
        [--official-tome /path/to/ToMe] [--only 'tome r=16' 'topk 0.7' 'zerotprune 0.7'] [--out zerotprune_vit]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

import tokensieve
from tokensieve.bench.image import pyplot, save_figure, time_alternating
from tokensieve.converters.sources import build_module, parse_source
from tokensieve.graph_passes.lint import lint
from tokensieve.graph_passes.propagate import propagate_shapes
from tokensieve.methods import parse_methods
from tokensieve.runtimes.ort import OrtRunner

RESULTS = Path(__file__).parent / "results"
NOISE_RATIO = 1.15  # a median this far above its minimum is flagged (after three attempts)
DIFFRATE_VIT_S_29 = (
    "diffrate(prune=[197,196,190,168,150,139,129,117,99,78,58,3], merge=[197,194,176,156,141,133,121,107,88,64,56,3])"
)


def naive_export(source: str, method: str, batch: int, path: Path) -> None:
    """The eager ToMe reference exported as-is (what a user gets from torch.onnx on eager merging code)."""
    import tokensieve.reference.merging as eager_merging
    from tokensieve.reference.reduce import ReducedModel

    eager_merging.argsort_desc = lambda values: values.argsort(dim=-1, descending=True)  # ToMe's matching sort
    model = ReducedModel(build_module(parse_source(source)).module, parse_methods(method)).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(batch, 3, 224, 224),), dynamo=True, opset_version=18).save(path)


def official_export(tome_dir: str, source: str, r: int, batch: int, path: Path) -> None:
    """The official ToMe patch (facebookresearch/ToMe, CC-BY-NC: imported at run time from a checkout the user
    supplies, never vendored) applied to the same timm model, exported with torch.onnx."""
    import sys

    sys.path.insert(0, tome_dir)
    import tome  # optional, external checkout

    model = build_module(parse_source(source)).module.eval()
    tome.patch.timm(model)
    model.r = r
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(batch, 3, 224, 224),), dynamo=True, opset_version=18).save(path)


def _lint_rules(path: Path) -> list[str]:
    model = ir.load(path)
    propagate_shapes(model)
    return sorted({f.rule for f in lint(model).errors})


def measure(runners: dict[str, OrtRunner], batch: int, blocks: int, per_block: int) -> dict[str, dict]:
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)}
    runs = {}
    for name, runner in runners.items():
        feed = {runner.input_names[0]: feeds["pixel_values"]}
        runs[name] = lambda r=runner, f=feed: r.run(f)
        for _ in range(5):
            runs[name]()
    for _attempt in range(3):
        times = time_alternating(runs, blocks, per_block)
        stats = {k: {"median_ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3} for k, v in times.items()}
        for s in stats.values():
            s["noisy"] = s["median_ms"] > NOISE_RATIO * s["min_ms"]
        if not any(s["noisy"] for s in stats.values()):
            break
    return stats


def variants(model: str, only: list[str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """The method strings timed (label -> method), and the naive-route ones; ``only``: just those labels."""
    methods = {"tome r=8": "tome(r=8)", "tome r=16": "tome(r=16)", "pitome 0.9": "pitome(ratio=0.9)"}
    methods["pitome 0.9 bsm first half"] = "pitome(ratio=0.9, bsm_layers='first_half')"  # the official schedule
    if model == "vit_small_patch16_224":
        methods["diffrate 2.9G"] = DIFFRATE_VIT_S_29
    methods["topk 0.7"] = "topk(keep=0.7, layers=[3,6,9])"  # pruning next to merging, same blocks and count
    methods["zerotprune 0.7"] = "zerotprune(keep=0.7, layers=[3,6,9])"
    naive = {"naive tome r=8": "tome(r=8)", "naive tome r=16": "tome(r=16)"}
    if only:
        methods = {k: v for k, v in methods.items() if k in only}
        naive = {k: v for k, v in naive.items() if k in only}
    return methods, naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--per-block", type=int, default=4)
    parser.add_argument("--official-tome", help="a checkout of facebookresearch/ToMe: also time its timm patch")
    parser.add_argument("--only", nargs="+", help="time only these variants (labels as printed), e.g. 'tome r=16'")
    parser.add_argument("--out", default="merge_vit", help="name of the JSON / PNG written to benchmarks/results/")
    args = parser.parse_args()
    source = f"timm:{args.model}"
    methods, naive = variants(args.model, args.only)
    results: dict = {"model": args.model, "threads": args.threads, "date": str(datetime.date.today()), "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            runners, macs = {}, {}
            for label, method in methods.items():
                art = tokensieve.export(source, method, Path(tmp) / f"{label.replace(' ', '_')}_b{batch}", batch=batch)
                runners.setdefault("baseline", art.runner("baseline", threads=args.threads, spin=False))
                runners[label] = art.runner("model", threads=args.threads, spin=False)
                macs["baseline"] = art.manifest.macs["baseline"]
                macs[label] = art.manifest.macs["model"]
            for label, method in naive.items():
                path = Path(tmp) / f"{label.replace(' ', '_')}_b{batch}.onnx"
                naive_export(source, method, batch, path)
                runners[label] = OrtRunner(path, threads=args.threads, spin=False)
                macs[label] = macs[label.removeprefix("naive ")]
                results.setdefault("naive_lint_trt10.3", _lint_rules(path))
            if args.official_tome:
                for r in (8, 16):
                    label = f"official tome r={r}"
                    path = Path(tmp) / f"official_{r}_b{batch}.onnx"
                    official_export(args.official_tome, source, r, batch, path)
                    runners[label] = OrtRunner(path, threads=args.threads, spin=False)
                    macs[label] = macs[f"tome r={r}"]
                    results.setdefault("official_lint_trt10.3", _lint_rules(path))
            stats = measure(runners, batch, args.blocks, args.per_block)
            base = stats["baseline"]["median_ms"]
            rows = {}
            for label, s in stats.items():
                limit = macs["baseline"] / macs[label]
                speedup = base / s["median_ms"]
                rows[label] = {
                    **s,
                    "speedup": speedup,
                    "limit_speedup": limit,
                    "fraction_of_limit": speedup / limit,
                    "gmacs": macs[label] / 1e9,
                }
            results["batches"][str(batch)] = rows
            print(f"\nbatch {batch} ({args.model}, ONNX Runtime CPU, {args.threads} threads; medians)")
            print("  variant            median ms   min ms   speedup   MAC-limit   achieved/limit")
            for label, r in rows.items():
                print(
                    f"  {label:<17} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} {r['speedup']:>8.3f}x "
                    f"{r['limit_speedup']:>9.3f}x {r['fraction_of_limit']:>13.3f}{'  (noisy)' if r['noisy'] else ''}"
                )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2))
    _plot(results, RESULTS / f"{args.out}.png")
    print(
        f"\nlint (trt10.3) error rules: naive route {results.get('naive_lint_trt10.3')}, "
        f"official ToMe {results.get('official_lint_trt10.3', 'not run')}"
    )
    print(f"wrote {RESULTS / f'{args.out}.json'}")


def _plot(results: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    batches = list(results["batches"])
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        rows = {k: v for k, v in results["batches"][batch].items() if k != "baseline"}
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["speedup"] for r in rows.values()], 0.4, label="measured")
        ax.bar(x + 0.2, [r["limit_speedup"] for r in rows.values()], 0.4, label="MAC limit")
        ax.set_xticks(x, list(rows), rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{results['model']}, batch {batch}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("speedup over unmerged")
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
