"""``tokensieve triton``: write an artifact into a Triton model repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokensieve.cli import options


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("triton", help="write an artifact into a Triton model repository")
    options.add_dir(p)
    options.add_out(p, "the model repository (created if absent; other models stay)")
    p.add_argument("--name", help="model name clients call (default: the artifact folder's name)")
    p.add_argument("--backend", choices=options.RUNTIMES, default="onnxruntime")
    options.add_max_batch(p, None, "max_batch_size (default 8, or the engines' profile maximum)")
    p.add_argument("--kind", choices=["auto", "gpu", "cpu"], default="auto", help="instance_group kind")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    models = load(args.dir).triton(
        args.out, name=args.name, backend=args.backend, max_batch=args.max_batch, kind=args.kind
    )
    print(f"wrote {len(models)} model(s) into {args.out}: {', '.join(models)}")
    print(f"clients call {models[0]!r}; serve with: tritonserver --model-repository {Path(args.out).resolve()}")
    return 0
