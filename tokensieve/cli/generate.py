"""``tokensieve generate``: greedy generation of an MLLM artifact from an image and a prompt."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from tokensieve.cli import options

if TYPE_CHECKING:
    from tokensieve.runtimes.llava import Generation


def add_parser(subparsers: options.Subparsers) -> None:
    p = subparsers.add_parser("generate", help="MLLM artifacts: greedy generation from an image and a prompt")
    options.add_dir(p)
    p.add_argument(
        "--image", action="append", help="image file (omit for a text-only prompt; repeat it for several images)"
    )
    p.add_argument("--prompt", required=True, help="the question; put into the chat template unless it has <image>")
    p.add_argument("--max-new-tokens", type=options.NON_NEGATIVE, default=32)
    p.add_argument("--cache", choices=["fixed", "growing"], default="fixed", help="decode graph to use")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument(
        "--template",
        help='chat template; {prompt} is replaced by the prompt (default "USER: <image>\\n{prompt} ASSISTANT:")',
    )
    options.add_threads(p, help="ONNX Runtime intra-op threads")
    options.add_json(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokensieve.api import load

    runner = load(args.dir).llava_runner(cache=args.cache, threads=args.threads)
    image = args.image[0] if args.image and len(args.image) == 1 else args.image
    out = runner.generate(image, args.prompt, args.max_new_tokens, ignore_eos=args.ignore_eos, template=args.template)
    if args.json:
        print(json.dumps(_info(out), indent=2))
    else:
        print(out.text)
        print(_summary(out, args.cache), file=sys.stderr)
    return 0


def _info(out: Generation) -> dict[str, Any]:
    """``--json``: the text, the token ids and what the method kept or cached."""
    return {
        "text": out.text,
        "ids": out.ids,
        "stop": out.stop,
        "prompt_tokens": len(out.prompt_ids),
        "image_span": out.image_span,
        "image_runs": out.image_runs,
        "kept_positions": None if out.kept_positions is None else out.kept_positions.tolist(),
        "cut_counts": None if out.cut_positions is None else [len(c) for c in out.cut_positions],
        "kept_image_tokens": None if out.kept_features is None else len(out.kept_features),
        "merged_windows": None if out.merged_windows is None else out.merged_windows.tolist(),
        "key_set": None if out.key_set is None else out.key_set.tolist(),
        "cached_prompt_positions": None if out.cache_positions is None else out.cache_positions.shape[-1],
        "cached_positions_at_end": None if out.retained_positions is None else out.retained_positions.shape[-1],
        "timings_ms": out.timings_ms,
    }


def _summary(out: Generation, cache: str) -> str:
    """The one-line stderr summary: tokens, stop reason, what was kept and the timings."""
    t = out.timings_ms
    kept = "" if out.cut_positions is None else f" (positions kept per cut: {[len(c) for c in out.cut_positions]})"
    if out.kept_features is not None:
        kept = f" (GlobalCom²: {len(out.kept_features)} vision tokens kept)"
    if out.merged_windows is not None:
        kept += f" (MustDrop: {len(out.merged_windows)} windows merged, key set of {len(out.key_set)})"
    if out.cache_positions is not None:
        kept = f" ({out.cache_positions.shape[-1]} prompt positions cached per layer and KV head)"
    if out.retained_positions is not None:
        kept = f" (H2O: {out.retained_positions.shape[-1]} positions cached per layer and KV head at the end)"
    per_token = "-" if t["decode_per_token"] is None else f"{t['decode_per_token']:.2f}"
    return (
        f"[{len(out.ids)} tokens, stop: {out.stop}; prompt {len(out.prompt_ids)} tokens, image span "
        f"{out.image_span}{kept}; vision {t['vision']:.1f} ms, prefill {t['prefill']:.1f} ms, decode "
        f"{per_token} ms/token, {cache} cache]"
    )
