"""Typed errors. Every user-facing failure is one of these: one clear message naming the problem and the fix.

The CLI turns them into a single line on stderr and a non-zero exit code (``TokensieveError.exit_code``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class TokensieveError(Exception):
    """Base class of every error tokensieve raises on purpose."""

    exit_code = 2


class MethodSpecError(TokensieveError):
    """A ``--method`` string or method parameter is malformed or out of range."""


class SourceError(TokensieveError):
    """The model source (``timm:NAME``, ``hf:...``, ``.onnx`` path, weights file) cannot be resolved or loaded."""


class ExportError(TokensieveError):
    """torch -> ONNX export failed."""


class LocateError(TokensieveError):
    """The graph does not contain transformer blocks tokensieve can locate (or they are ambiguous)."""


class GraphRewriteError(TokensieveError):
    """A graph pass could not rewrite the graph safely (e.g. a constant it cannot retarget)."""


class ArtifactError(TokensieveError):
    """An artifact directory is missing, incomplete, or cannot be written."""


class ParityError(TokensieveError):
    """Parity could not be checked (no eager reference available, mismatched inputs...)."""


class RuntimeBackendError(TokensieveError):
    """A runtime backend (ONNX Runtime provider, TensorRT) is unavailable or failed."""


class PromptError(TokensieveError):
    """An MLLM prompt does not fit its image: image placeholders that do not match the image features."""


class CapacityError(TokensieveError):
    """A sequence does not fit the fixed KV-cache capacity the decode graph was exported with."""


class InputError(TokensieveError):
    """A runtime input (an image file, an image array) cannot be used."""


class GateError(TokensieveError):
    """A registry-gate policy or path is unusable (unknown key, wrong type, no artifact found)."""


class DataError(TokensieveError):
    """Evaluation data (an image folder, an ImageFolder tree, a JSONL of prompts) cannot be used; names the file or
    line."""


class OptionError(TokensieveError):
    """A count given to a command or API call is out of its range (timing blocks, parity cases, ...)."""


def check_positive(name: str, value: float) -> float:
    """``value`` if it is a finite number above 0, else an :class:`OptionError` naming ``name``."""
    if not (math.isfinite(value) and value > 0):
        raise OptionError(f"{name} must be a finite number above 0, got {value}")
    return value


def check_at_least(name: str, value: int, low: int) -> int:
    """``value`` if it is at least ``low``, else an :class:`OptionError` naming ``name``."""
    if value < low:
        raise OptionError(f"{name} must be at least {low}, got {value}")
    return value


def read_json(path: str | Path, error: type[TokensieveError], what: str) -> Any:
    """Parse a JSON file the user named; an unreadable or malformed file is ``error`` naming ``what``."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise error(f"cannot read {what} {str(path)!r}: {e.strerror}") from None
    except ValueError as e:
        raise error(f"{what} {str(path)!r} is not valid JSON: {e}") from None
