"""DyVTE prefill: latency of the cut prefill when the image exits and when it does not, against the unreduced
prefill graph and the MAC limit.

One run: export the source unreduced and with ``dyvte(layers=[K], threshold=T)`` for T = 0 (never exits: what the
segments and the decision cost) and T = 1 (always exits: the image leaves before layer K), fixed-cache decode only;
time each prefill on ONNX Runtime CPU (2 threads) on FastV's LLaVA-1.5-shaped prompt (BOS + 35 system tokens, the
image tokens, 24 question tokens). Variants alternate in blocks after a warm-up; medians (minima kept to show
noise); the MAC limit as in ``bench_llava_fastv.py``. Writes ``benchmarks/results/llava_dyvte.json`` and
``llava_dyvte.png``.

    python benchmarks/bench_llava_dyvte.py [--source llava-1.5-7b-shapes] [--layer 1]
"""

from __future__ import annotations

import argparse
import json

from bench_llava_fastv import RESULTS, bench_cut_prefill, plot

from tokensieve.methods.dyvte import DyVTE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="llava-1.5-7b-shapes")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--per-block", type=int, default=2)
    args = parser.parse_args()
    methods = {
        "none": None,
        "dyvte, no exit": DyVTE(layers=(args.layer,), threshold=0.0),
        "dyvte, exit": DyVTE(layers=(args.layer,), threshold=1.0),
    }
    results = bench_cut_prefill(args.source, methods, args.threads, args.blocks, args.per_block)
    results.update(layer=args.layer)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llava_dyvte.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / "llava_dyvte.png", f"DyVTE exit before layer {args.layer}")


if __name__ == "__main__":
    main()
