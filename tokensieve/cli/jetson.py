"""``tokensieve jetson``: a bundle that builds and checks an artifact's engines on a Jetson with trtexec."""

from __future__ import annotations

import argparse

from tokensieve.cli import options


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("jetson", help="a bundle that builds and checks the engines on a Jetson with trtexec")
    options.add_dir(p)
    options.add_out(p, "the bundle: a folder, or a file ending in .tar.gz")
    p.add_argument("--jetpack", default="6.2", help="6.1, 6.2, 7.0, 7.1, 7.2, 7.2.2 (sets TensorRT and the lint)")
    p.add_argument("--fp16", action="store_true", help="trtexec --fp16 (TensorRT 10.x JetPacks)")
    options.add_max_batch(p, 8, "profile maximum for a dynamic batch axis")
    p.add_argument(
        "--dla",
        type=options.NON_NEGATIVE,
        metavar="CORE",
        help="build the static graphs for this DLA core (GPU fallback)",
    )
    p.add_argument("--dla-batch", type=options.POSITIVE, default=1, help="the fixed batch of DLA engines (default 1)")
    options.add_dims(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    info = load(args.dir).jetson(
        args.out,
        jetpack=args.jetpack,
        fp16=args.fp16,
        max_batch=args.max_batch,
        dims=options.parse_dims(args.dim),
        dla=args.dla,
        dla_batch=args.dla_batch,
    )
    print(
        f"wrote {args.out}: {len(info['graphs'])} graph(s) for JetPack {info['jetpack']} (TensorRT "
        f"{info['tensorrt']}, {info['devices']}), {info['lint']['target']} lint clean; on the device run "
        "jetson/build_engines.sh, then jetson/check.sh, from the bundle folder"
    )
    dla = info["dla"]
    if dla:
        print(
            f"DLA core {dla['core']}: {len(dla['graphs'])} graph(s) at batch {dla['batch']} (GPU fallback for the "
            f"layers the DLA lacks); {len(dla['gpu_graphs'])} graph(s) with other symbolic axes on the GPU"
        )
    return 0
