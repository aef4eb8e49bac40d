"""``tokensieve inspect``: blocks, tokens per block, sites, MACs and lint result of an artifact."""

from __future__ import annotations

import argparse
import json

from tokensieve.cli import options


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("inspect", help="blocks, tokens per block, sites, MACs and lint result of an artifact")
    options.add_dir(p)
    p.add_argument(
        "--load", action="store_true", help="also time each graph's ONNX Runtime session and the weights it binds"
    )
    options.add_threads(p, help="ONNX Runtime intra-op threads (with --load)")
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load
    from tokensieve.inspect.image import format_inspection

    artifact = load(args.dir)
    info = artifact.inspect()
    if args.load:
        from tokensieve.inspect.load import format_load_costs, load_costs

        info["load"] = load_costs(artifact, args.threads)
    text = format_inspection(info) + (f"\n{format_load_costs(info['load'])}" if args.load else "")
    print(json.dumps(info, indent=2) if args.json else text)
    return 0
