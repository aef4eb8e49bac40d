"""``tokensieve export``: a model to ONNX with token reduction inside the graph."""

from __future__ import annotations

import argparse

from tokensieve.cli import options


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX with token reduction inside the graph")
    p.add_argument("source", help="timm:NAME, hf:PRESET|hf:PATH, or path/to/model.onnx")
    options.add_method(p)
    options.add_out(p, "artifact directory to create (replaced atomically if it exists)")
    p.add_argument("--weights", help="local checkpoint file for a timm model (random weights otherwise)")
    options.add_seed(p, "seed of the random weights and example input")
    options.add_img_size(p, "input resolution (default: the model's)")
    p.add_argument("--batch", type=options.POSITIVE, default=1, help="static batch size (default 1)")
    p.add_argument("--dynamic-batch", action="store_true", help="make the batch axis symbolic")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    options.add_specials(p, "override the detected number of leading special tokens")
    p.add_argument("--lint-target", default="trt10.3", help="target recorded in the manifest's lint result")
    p.add_argument("--buckets", help="adaptive methods: 'auto' (from --calibrate data) or sizes, e.g. 64,96,128")
    p.add_argument(
        "--max-buckets", type=options.POSITIVE, default=6, help="at most this many buckets with --buckets auto"
    )
    p.add_argument("--calibrate", help="calibration data: a folder of images or an .npz of input batches")
    p.add_argument("--target-keep", type=float, help="calibrate atp's threshold to keep this fraction on average")
    p.add_argument(
        "--allow-truncation",
        action="store_true",
        help="let an image with more tokens than the largest bucket run truncated (reported)",
    )
    p.add_argument(
        "--restore-grid",
        choices=["auto", "on", "off"],
        default="auto",
        help="rebuild the full token grid before readers of block outputs (dense heads, intermediate taps); auto: "
        "when a reader folds the tokens into a spatial grid",
    )
    p.add_argument(
        "--capacity", type=int, help="MLLMs: KV-cache slots of the static decode graph (h2o: budget + 1 by default)"
    )
    p.add_argument("--no-growing-cache", action="store_true", help="MLLMs: skip the growing-cache decode graph")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import export
    from tokensieve.inspect.image import format_inspection

    artifact = export(
        args.source,
        args.method,
        args.out,
        **options.pick(args, "weights", "seed", "img_size", "batch", "dynamic_batch", "opset", "exporter", "specials"),
        **options.pick(args, "lint_target", "max_buckets", "calibrate", "target_keep", "allow_truncation", "capacity"),
        buckets=options.parse_buckets(args.buckets),
        restore_grid={"on": True, "off": False}.get(args.restore_grid, "auto"),
        growing_cache=not args.no_growing_cache,
    )
    print(format_inspection(artifact.inspect()))
    return 0
