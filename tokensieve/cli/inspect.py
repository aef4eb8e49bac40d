"""``tokensieve inspect``: blocks, tokens per block, sites, MACs and lint result of an artifact."""

from __future__ import annotations

import argparse
import json

from tokensieve.cli import options


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("inspect", help="blocks, tokens per block, sites, MACs and lint result of an artifact")
    options.add_dir(p)
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load
    from tokensieve.inspect.image import format_inspection

    info = load(args.dir).inspect()
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0
