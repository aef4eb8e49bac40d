"""Argument groups and parse helpers the ``tokensieve`` commands share.

Each ``add_*`` function adds one option (or a pair that belongs together) to a command's parser, so an option means
the same thing, with the same type and choices, on every command that takes it; the per-command help text is passed
in where a command says something of its own. The parse helpers turn option text into what the API takes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from tokensieve.errors import InputError, OptionError, TokensieveError, check_at_least

if TYPE_CHECKING:
    from tokensieve.converters.sources import SourceSpec

Subparsers = argparse._SubParsersAction  # what ``ArgumentParser.add_subparsers`` returns

RUNTIMES = ("onnxruntime", "tensorrt")

METHOD_HELP = (
    'e.g. "topk(keep=0.7, layers=[3,6,9])", "tome(r=8)", "atp()"; MLLMs: "fastv(k=2, keep=0.5)", '
    '"atp_llava(layers=[2], offset=0.5)" (LLaVA), "dyvte(layers=[2, 4], threshold=0.1)", '
    '"mustdrop(layers=[2, 6, 10, 14])" (LLaVA), '
    '"globalcom2(retention=0.25)" (LLaVA-NeXT), "streamingllm(sink=4)", "snapkv(budget=256, window=32)", '
    '"a2sf(budget=256)" or "h2o(budget=256, recent=128)"; omitted or "none" exports the unreduced model'
)


# --- parse helpers -------------------------------------------------------------------------------------------------


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer of at least ``low`` (the API's :func:`check_at_least` rule)."""

    def parse(text: str) -> int:
        try:
            return check_at_least("value", int(text), low)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


POSITIVE, NON_NEGATIVE = at_least(1), at_least(0)


def parse_size(text: str) -> tuple[int, int]:
    """argparse type: ``HxW`` -> ``(H, W)``."""
    height, _, width = text.lower().partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels such as 672x336, got {text!r}")
    return int(height), int(width)


def parse_buckets(text: str | None) -> str | list[int] | list[tuple[int, int]] | None:
    """``--buckets``: ``None``, ``"auto"``, a list of token counts (``64,96,128``) or of grids of patches
    (``16x16,16x24``: Qwen-VL's vision buckets, rows x columns)."""
    if text is None or text == "auto":
        return text
    try:
        if "x" in text:
            return [tuple(int(side) for side in item.split("x", 1)) for item in text.split(",")]
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise TokensieveError(
            f"--buckets takes 'auto', comma-separated token counts (64,96) or grids (16x16,16x24), got {text!r}"
        ) from None


def parse_dims(texts: list[str]) -> dict[str, tuple[int, int, int]]:
    """``--dim AXIS=MIN:OPT:MAX`` options as profile ranges."""
    dims = {}
    for text in texts:
        axis, _, values = text.partition("=")
        parts = values.split(":")
        if not axis or len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise InputError(f"--dim {text!r}: expected AXIS=MIN:OPT:MAX with integers, e.g. sequence=1:640:2048")
        low, opt, high = map(int, parts)
        if not low <= opt <= high:
            raise InputError(f"--dim {text!r}: needs MIN <= OPT <= MAX")
        dims[axis] = (low, opt, high)
    return dims


def pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options ``names`` as keyword arguments of the API call they are passed to unchanged."""
    return {name: getattr(args, name) for name in names}


def reference_source(args: argparse.Namespace) -> SourceSpec | None:
    """The eager source ``--reference``/``--weights`` name (``None`` without ``--reference``)."""
    if not args.reference:
        return None
    from tokensieve.converters.sources import parse_source

    # quantize takes no --seed: its reference is built with the default seed
    return parse_source(args.reference, weights=args.weights, seed=getattr(args, "seed", 0))


# --- output --------------------------------------------------------------------------------------------------------


class Report(Protocol):
    def to_dict(self) -> dict[str, Any]: ...

    def text(self) -> str: ...


def print_report(report: Report, as_json: bool) -> None:
    """A report as indented JSON (``--json``) or as its text."""
    print(json.dumps(report.to_dict(), indent=2) if as_json else report.text())


# --- argument groups -----------------------------------------------------------------------------------------------


def add_dir(parser: argparse.ArgumentParser) -> None:
    """The artifact directory a command works on."""
    parser.add_argument("dir")


def add_method(parser: argparse.ArgumentParser, *, candidates: bool = False) -> None:
    """``--method``: the one method to export (default none), or with ``candidates`` several to compare."""
    if candidates:
        parser.add_argument("--method", action="append", required=True, help="a candidate; repeat to compare several")
    else:
        parser.add_argument("--method", nargs="?", const="none", default="none", help=METHOD_HELP)


def add_out(parser: argparse.ArgumentParser, help: str) -> None:
    """``--out``: where the command writes (required)."""
    parser.add_argument("--out", required=True, help=help)


def add_runtime(parser: argparse.ArgumentParser, help: str) -> None:
    """``--runtime``: ONNX Runtime (default) or the TensorRT engines ``tokensieve build`` wrote."""
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime", help=help)


def add_tolerance(parser: argparse.ArgumentParser, help: str, default: float | None = None) -> None:
    """``--tolerance``: max output error relative to the output scale."""
    parser.add_argument("--tolerance", type=float, default=default, help=help)


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``: print the result as JSON."""
    parser.add_argument("--json", action="store_true")


def add_threads(parser: argparse.ArgumentParser, default: int | None = None, help: str | None = None) -> None:
    """``--threads``: ONNX Runtime intra-op threads."""
    parser.add_argument("--threads", type=POSITIVE, default=default, help=help)


def add_seed(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--seed``: of random weights and example inputs (default 0)."""
    parser.add_argument("--seed", type=int, default=0, help=help)


def add_reference(parser: argparse.ArgumentParser) -> None:
    """``--reference`` and ``--weights``: the eager source of an artifact exported from an .onnx file."""
    parser.add_argument(
        "--reference", help="eager source for artifacts exported from an .onnx file (timm:NAME, hf:...)"
    )
    parser.add_argument("--weights", help="checkpoint for --reference")


def add_specials(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--specials``: the number of leading special tokens of an image model (detected by default)."""
    parser.add_argument("--specials", type=NON_NEGATIVE, help=help)


def add_img_size(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--img-size``: an image model's input resolution."""
    parser.add_argument("--img-size", type=POSITIVE, help=help)


def add_max_batch(parser: argparse.ArgumentParser, default: int | None, help: str) -> None:
    """``--max-batch``: the largest batch a dynamic batch axis is built or served for."""
    parser.add_argument("--max-batch", type=POSITIVE, default=default, help=help)


def add_dims(parser: argparse.ArgumentParser) -> None:
    """``--dim AXIS=MIN:OPT:MAX`` (repeatable): a symbolic axis' engine profile range; parse with :func:`parse_dims`."""
    parser.add_argument(
        "--dim", action="append", default=[], metavar="AXIS=MIN:OPT:MAX", help="a symbolic axis' profile range"
    )
