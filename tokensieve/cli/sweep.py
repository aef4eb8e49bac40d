"""``tokensieve sweep``: export, evaluate and time every strength of a method grid; table and Pareto chart."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokensieve.cli import options
from tokensieve.cli.eval import add_quality

EXPORT_OPTIONS = ("img_size", "weights", "calibrate", "capacity")  # passed to every export when given


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("sweep", help="export, eval and bench every strength of a method grid; Pareto chart")
    p.add_argument("source", help="timm:NAME, hf:PRESET|hf:PATH, or path/to/model.onnx")
    p.add_argument("--method", required=True, help='a grid with one list argument, e.g. "tome(r=[4,8,12,16])"')
    options.add_out(p, "sweep folder (artifacts, sweep.json, sweep.png), replaced at the end")
    add_quality(p)
    options.add_threads(p, default=2)
    options.add_seed(p, "seed of the random weights")
    options.add_img_size(p, "input resolution (default: the model's)")
    p.add_argument("--weights", help="local checkpoint file for a timm model")
    p.add_argument("--buckets", help="adaptive methods: 'auto' (from --calibrate data) or sizes, e.g. 64,96,128")
    p.add_argument("--calibrate", help="adaptive methods: calibration images")
    p.add_argument("--capacity", type=int, help="MLLMs: KV-cache slots of the decode graph")
    p.add_argument("--json", action="store_true", help="print JSON; no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import sweep

    given = {key: getattr(args, key) for key in EXPORT_OPTIONS if getattr(args, key) is not None}
    if args.buckets:
        given["buckets"] = options.parse_buckets(args.buckets)
    quality = options.pick(args, "baseline", "task", "limit", "new_tokens", "threads", "seed")
    report = sweep(args.source, args.method, args.data, args.out, quiet=args.json, **quality, **given)
    options.print_report(report, args.json)
    print(f"wrote {Path(args.out) / 'sweep.json'} and sweep.png", file=sys.stderr)
    return 0
