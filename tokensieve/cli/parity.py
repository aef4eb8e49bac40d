"""``tokensieve parity``: exported graph vs eager PyTorch reference (values and kept tokens), or a golden replay."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from tokensieve.cli import options
from tokensieve.errors import ArtifactError

if TYPE_CHECKING:
    from tokensieve.api import Artifact


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("parity", help="exported graph vs eager PyTorch reference: values and kept tokens")
    options.add_dir(p)
    options.add_reference(p)
    p.add_argument("--batch", type=options.POSITIVE, help="batch for dynamic-batch graphs (default 2)")
    options.add_seed(p)
    options.add_tolerance(p, "max error relative to the output scale (default 1e-4; quantized: its budget)")
    p.add_argument("--no-golden", action="store_true", help="do not write the golden files")
    p.add_argument(
        "--replay",
        action="store_true",
        help="check against the golden files a previous parity run wrote (no torch or eager model needed)",
    )
    p.add_argument("--device", default="cpu", help="where the eager reference runs (cuda: a single-graph image model)")
    p.add_argument(
        "--cases", type=options.POSITIVE, default=4, help="MLLMs: random prompt/image cases (several aspect ratios)"
    )
    p.add_argument("--new-tokens", type=options.POSITIVE, default=32, help="MLLMs: greedy tokens compared per case")
    options.add_runtime(p, "with --replay: run the engine `build` wrote")
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    artifact = load(args.dir)
    if args.runtime != "onnxruntime" and (not args.replay or artifact.kind == "mllm"):
        raise ArtifactError(
            "--runtime tensorrt replays an image model's golden files on its engine: use it with --replay after "
            "`tokensieve parity` and `tokensieve build` (MLLM generation runs on ONNX Runtime)"
        )
    tolerance = {} if args.tolerance is None else {"tolerance": args.tolerance}
    if args.replay:
        kwargs = {"runtime": args.runtime} if artifact.kind != "mllm" else {}
        report = artifact.replay(**tolerance, **kwargs)
    elif artifact.kind == "mllm":
        report = artifact.parity(
            count=args.cases, new_tokens=args.new_tokens, seed=args.seed, golden=not args.no_golden, **tolerance
        )
    else:
        report = _image_parity(artifact, args, tolerance)
    options.print_report(report, args.json)
    return 0 if report.ok else 1


def _image_parity(artifact: Artifact, args: argparse.Namespace, tolerance: dict[str, float]) -> Any:
    """An image model's graph against its eager reference (on ``--device`` for a single-graph artifact)."""
    if args.device != "cpu" and artifact.kind == "staged":
        raise ArtifactError("--device runs a single-graph artifact's eager reference on the GPU, not a staged one")
    return artifact.parity(
        reference=options.reference_source(args),
        batch=args.batch,
        seed=args.seed,
        golden=not args.no_golden,
        **tolerance,
        **({"device": args.device} if args.device != "cpu" else {}),
    )
