"""``tokensieve plan``: MACs of candidate methods before exporting (MLLMs: the KV cache too)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokensieve.cli import options
from tokensieve.errors import SourceError

MLLM_OPTIONS = ("text_tokens", "new_tokens", "image_size", "image_tokens", "capacity")


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("plan", help="MACs of candidate methods before exporting (MLLMs: cache too)")
    p.add_argument("source", help="timm:NAME, hf:..., an .onnx file, or an artifact directory (its baseline)")
    options.add_method(p, candidates=True)
    options.add_specials(p)
    options.add_seed(p)
    options.add_img_size(p)
    p.add_argument(
        "--text-tokens", type=options.NON_NEGATIVE, help="MLLMs: prompt tokens besides the image (default 60)"
    )
    p.add_argument("--new-tokens", type=options.NON_NEGATIVE, help="MLLMs: tokens generated (default 256)")
    p.add_argument(
        "--image-size", type=options.parse_size, help="MLLMs: HxW of the image (LLaVA-NeXT's token count depends on it)"
    )
    p.add_argument("--image-tokens", type=options.NON_NEGATIVE, help="MLLMs: image tokens (instead of --image-size)")
    p.add_argument("--capacity", type=int, help="MLLMs: StreamingLLM's cache slots (default: the source's capacity)")
    options.add_json(p)
    p.set_defaults(func=run)


def _is_mllm(source: str) -> bool:
    """An ``hf:`` MLLM source (a preset or checkpoint of an MLLM family) or an MLLM artifact directory."""
    from tokensieve.converters.families import is_mllm_source

    manifest = Path(source) / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("kind") == "mllm"
    name = source.removeprefix("hf:")
    return source.startswith("hf:") and is_mllm_source(name)


def run(args: argparse.Namespace) -> int:
    from tokensieve.plan.image import format_plan, plan, plan_dicts

    mllm = _is_mllm(args.source)
    misplaced = [key for key in (("specials", "img_size") if mllm else MLLM_OPTIONS) if getattr(args, key) is not None]
    if misplaced:
        flag = "--" + misplaced[0].replace("_", "-")
        raise SourceError(f"{flag} applies to {'image models' if mllm else 'MLLM sources'}, not to {args.source}")
    if mllm:
        from tokensieve.plan.mllm import format_mllm_plan, mllm_plan_dict, plan_mllm

        given = {key: getattr(args, key) for key in MLLM_OPTIONS if getattr(args, key) is not None}
        prompt, rows = plan_mllm(args.source, args.method, **given)
        print(json.dumps(mllm_plan_dict(prompt, rows), indent=2) if args.json else format_mllm_plan(prompt, rows))
        return 0
    rows = plan(args.source, args.method, specials=args.specials, seed=args.seed, img_size=args.img_size)
    print(json.dumps(plan_dicts(rows), indent=2) if args.json else format_plan(rows))
    return 0
