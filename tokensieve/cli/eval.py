"""``tokensieve eval``: quality of an artifact against the unreduced model on the user's data (writes eval.json)."""

from __future__ import annotations

import argparse
import sys

from tokensieve.cli import options

TASKS = ("classify", "embed", "dense", "generate")


def add_quality(parser: argparse.ArgumentParser) -> None:
    """The options ``eval`` and ``sweep`` share: the data, the MLLM baseline, the task, how much to evaluate."""
    parser.add_argument("--data", required=True, help="images (folder, ImageFolder tree, .npz) or MLLMs: a JSONL file")
    parser.add_argument("--baseline", help="MLLMs: the unreduced artifact (exported with --method none)")
    parser.add_argument("--task", choices=TASKS, help="override the task read from the outputs")
    parser.add_argument("--limit", type=options.POSITIVE, help="evaluate at most this many images / prompts")
    parser.add_argument(
        "--new-tokens", type=options.POSITIVE, default=16, help="MLLMs: greedy tokens per prompt (default 16)"
    )


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("eval", help="quality against the unreduced model on your data (writes eval.json)")
    options.add_dir(p)
    add_quality(p)
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    artifact = load(args.dir)
    given = options.pick(args, "task", "limit")
    if artifact.kind == "mllm":
        given["new_tokens"] = args.new_tokens
    report = artifact.eval(args.data, baseline=args.baseline, quiet=args.json, **given)
    options.print_report(report, args.json)
    print(f"wrote {artifact.path / 'eval.json'}", file=sys.stderr)
    return 0
