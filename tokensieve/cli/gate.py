"""``tokensieve gate``: registry gate (digests, lint, golden parity replay and budgets); exit 1 on failure."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokensieve.cli import options


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser(
        "gate", help="registry gate: digests, lint, golden parity replay and budgets; exit 1 on failure"
    )
    p.add_argument("paths", nargs="+", help="artifact directories or registry folders holding artifacts")
    p.add_argument("--policy", help="JSON policy: target, require_golden, tolerance, methods, budgets")
    p.add_argument("--target", help="lint target (overrides the policy's; default trt10.3)")
    p.add_argument("--junit", help="also write a JUnit XML report to this file")
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tokensieve.artifact.store import atomic_write_text
    from tokensieve.gate import Policy, gate

    policy = Policy.load(args.policy) if args.policy else Policy()
    if args.target:
        policy = replace(policy, target=args.target)
    report = gate(args.paths, policy)
    if args.junit:
        atomic_write_text(Path(args.junit), report.junit())
    options.print_report(report, args.json)
    return 0 if report.ok else 1
