"""``tokensieve`` command line: export, inspect, parity, build, lint, plan, bench, eval, sweep, gate, generate, ...

Exit codes: 0 success; 1 a check failed (parity mismatch, lint errors); 2 bad input or an operation that could
not be carried out (a typed tokensieve error, printed as one line).

One module per command, each with ``add_parser(subparsers)`` and ``run(args) -> int``; the options several commands
take, and the parse helpers, live in :mod:`tokensieve.cli.options`.
"""

from __future__ import annotations

import argparse
import sys

from tokensieve.cli import (
    bench,
    build,
    eval,
    export,
    gate,
    generate,
    inspect,
    jetson,
    lint,
    parity,
    plan,
    quantize,
    sweep,
    triton,
)
from tokensieve.errors import TokensieveError

# in the order ``tokensieve --help`` lists them
COMMANDS = (export, inspect, parity, quantize, build, jetson, triton, lint, plan, bench, eval, sweep, gate, generate)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensieve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TokensieveError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
