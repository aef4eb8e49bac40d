"""``tokensieve bench``: latency of the reduced vs the unreduced graph against the MAC-limit speedup."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from tokensieve.cli import options
from tokensieve.errors import ArtifactError

if TYPE_CHECKING:
    from tokensieve.api import Artifact

# option -> (the artifact kind it applies to, how the error message names that kind)
KIND_OPTIONS = {
    "batch": ("image", "single-graph"),
    "data": ("staged", "staged (bucketed)"),
    "contexts": ("mllm", "MLLM"),
}


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("bench", help="latency of reduced vs unreduced graph against the MAC-limit speedup")
    options.add_dir(p)
    p.add_argument("--batch", type=options.POSITIVE, nargs="+", help="batch sizes (default: static batch, or 1 8)")
    options.add_threads(p, default=2)
    p.add_argument("--warmup", type=options.NON_NEGATIVE, default=5)
    p.add_argument("--blocks", type=options.POSITIVE, default=6, help="alternating measurement blocks")
    p.add_argument("--per-block", type=options.POSITIVE, default=5, help="runs per variant per block")
    p.add_argument("--data", help="staged artifacts: images (folder or .npz) to measure over (default: samples)")
    p.add_argument("--contexts", type=options.POSITIVE, nargs="+", help="MLLMs: context lengths for decode latency")
    options.add_runtime(p, "tensorrt: the engines `build` wrote")
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    artifact = load(args.dir)
    if args.runtime != "onnxruntime" and artifact.kind == "mllm":
        raise ArtifactError("--runtime tensorrt benchmarks an image model's engines (tokensieve build), not an MLLM's")
    kind = artifact.kind
    for key, (applies, what) in KIND_OPTIONS.items():
        if getattr(args, key) is not None and kind != applies:
            raise ArtifactError(f"--{key} applies to {what} artifacts; {args.dir} is not one")
    report = _bench(artifact, kind, args)
    options.print_report(report, args.json)
    print(f"wrote {artifact.path / 'bench.json'}", file=sys.stderr)
    return 0


def _bench(artifact: Artifact, kind: str, args: argparse.Namespace) -> Any:
    """The measurement the artifact's kind takes (``image``, ``staged`` or ``mllm``)."""
    if kind == "mllm":
        return artifact.bench(
            contexts=args.contexts, threads=args.threads, blocks=args.blocks, per_block=args.per_block
        )
    if kind == "staged":
        from tokensieve.exporter.staged import load_data

        pre = artifact.manifest.preprocessing
        data = load_data(args.data, pre["shape"], pre["mean"], pre["std"]) if args.data else None
        return artifact.bench(data=data, threads=args.threads, blocks=args.blocks, runtime=args.runtime)
    return artifact.bench(
        batches=args.batch, **options.pick(args, "threads", "warmup", "blocks", "per_block", "runtime")
    )
