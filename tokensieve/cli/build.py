"""``tokensieve build``: TensorRT engines for every graph of an artifact (needs tensorrt and an NVIDIA GPU)."""

from __future__ import annotations

import argparse
import json

from tokensieve.cli import options


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("build", help="TensorRT engines for every graph (needs tensorrt and an NVIDIA GPU)")
    options.add_dir(p)
    p.add_argument("--fp16", action="store_true", help="TensorRT 10.x FP16 (11.x: convert the ONNX instead)")
    options.add_max_batch(p, 32, "profile maximum for a dynamic batch axis")
    options.add_dims(p)
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    report = load(args.dir).build(fp16=args.fp16, max_batch=args.max_batch, dims=options.parse_dims(args.dim))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for onnx, engine in report["engines"].items():
            print(f"{onnx} -> {engine['plan']} ({engine['bytes'] / 2**20:.1f} MiB, {engine['seconds']} s)")
    return 0
