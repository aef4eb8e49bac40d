"""``tokensieve quantize``: an INT8 QDQ copy of an image-model artifact (token selection kept float32)."""

from __future__ import annotations

import argparse

from tokensieve.cli import options
from tokensieve.errors import ArtifactError


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="INT8 QDQ copy of an image-model artifact (token selection kept float32)"
    )
    options.add_dir(p)
    p.add_argument("--calibrate", required=True, help="images (folder) or .npz of input batches")
    options.add_out(p, "the quantized artifact's directory")
    p.add_argument("--calibration", default="minmax", help="minmax, entropy or percentile")
    p.add_argument("--limit", type=options.POSITIVE, default=64, help="calibration images used (default 64)")
    options.add_tolerance(p, "drift budget: output error of the output scale", default=0.05)
    p.add_argument(
        "--min-agreement", type=float, default=0.9, help="drift budget: share of tokens in the same kept group"
    )
    p.add_argument("--no-parity", action="store_true", help="do not hold the result to the eager reference")
    options.add_reference(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load
    from tokensieve.exporter.staged import load_data

    source = load(args.dir)
    if source.kind == "mllm":
        raise ArtifactError(f"{args.dir} is an MLLM artifact; quantize takes an image-model artifact (no MLLM INT8)")
    pre = source.manifest.preprocessing
    data = load_data(args.calibrate, pre["shape"], pre["mean"], pre["std"], limit=args.limit)
    artifact = source.quantize(
        data, args.out, calibration=args.calibration, tolerance=args.tolerance, min_agreement=args.min_agreement
    )
    print(f"wrote {artifact.path} (INT8 QDQ, {len(data)} calibration images, lint {artifact.manifest.lint['ok']})")
    if args.no_parity:
        return 0
    report = artifact.parity(reference=options.reference_source(args))
    print(report.text())
    return 0 if report.ok else 1
