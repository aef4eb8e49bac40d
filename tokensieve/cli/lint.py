"""``tokensieve lint``: TensorRT-compatibility report of an .onnx file or an artifact; exit 1 on errors."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokensieve.cli import options
from tokensieve.errors import SourceError, TokensieveError


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("lint", help="TensorRT-compatibility report; exit 1 on errors")
    p.add_argument("path", help="an .onnx file or an artifact directory")
    p.add_argument("--target", default="trt10.3", help="trt10.3 (JetPack 6), trt10, trt11")
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load
    from tokensieve.graph_passes.lint import lint
    from tokensieve.graph_passes.propagate import propagate_shapes
    from tokensieve.onnx_file import load_onnx

    path = Path(args.path)
    if path.is_dir():
        report = load(path).lint(args.target)
    else:
        if not path.is_file():
            raise TokensieveError(f"{path} does not exist; pass an .onnx file or an artifact directory")
        model = load_onnx(path, SourceError)
        propagate_shapes(model)
        report = lint(model, args.target)
    options.print_report(report, args.json)
    return 0 if report.ok else 1
