"""ATP-LLaVA prefill: latency of the cut prefill (segment graphs with the host's decisions between them) against
the unreduced prefill graph and the MAC limit, for several threshold offsets.

One run: export the source unreduced and with ``atp_llava(layers=[K, ...], offset=O)`` for each O (fixed-cache
decode only), then time each prefill on ONNX Runtime CPU (2 threads) on FastV's LLaVA-1.5-shaped prompt (BOS + 35
system tokens, the image tokens, 24 question tokens); the kept count is what the rule decides on that prompt.
Variants alternate in blocks after a warm-up; medians (minima kept to show noise); the MAC limit as in
``bench_llava_fastv.py`` (the scores' own cost is not counted). Writes ``benchmarks/results/llava_atp.json`` and
``llava_atp.png``.

    python benchmarks/bench_llava_atp.py [--source llava-1.5-7b-shapes] [--layers 1] [--offset 0 0.5 1]
"""

from __future__ import annotations

import argparse
import json

from bench_llava_fastv import RESULTS, bench_cut_prefill, plot

from tokensieve.methods.atp_llava import ATPLLaVA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="llava-1.5-7b-shapes")
    parser.add_argument("--layers", type=int, nargs="+", default=[1])
    parser.add_argument("--offset", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--grid", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--per-block", type=int, default=2)
    args = parser.parse_args()
    methods = {"none": None}
    for offset in args.offset:
        methods[f"atp offset={offset:g}"] = ATPLLaVA(layers=tuple(args.layers), offset=offset, grid=args.grid)
    results = bench_cut_prefill(args.source, methods, args.threads, args.blocks, args.per_block)
    results.update(layers=args.layers, grid=args.grid)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llava_atp.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "llava_atp.png", f"ATP-LLaVA layers={args.layers}")


if __name__ == "__main__":
    main()
