"""ONNX -> ONNX rewrites on onnx-ir (one pass per module) plus graph analyses (locate, lint, MACs).

This package never imports torch or ``tokensieve.reference``: it runs on a deployment box with only onnx,
onnx-ir, onnxscript and onnxruntime installed.
"""

from __future__ import annotations

import onnx_ir as ir

from tokensieve.errors import GraphRewriteError, TokensieveError
from tokensieve.methods.faces import Faces

FACES = Faces(__name__)  # the methods' graph faces ("export", "prefill_scores", "cache_score", "site"), by class


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> ir.passes.PassResult:
    """Run passes in order; a tokensieve error raised inside a pass surfaces as itself, not as a PassError."""
    try:
        return ir.passes.PassManager(passes)(model)
    except ir.passes.PassError as e:
        cause: BaseException = e
        while not isinstance(cause, TokensieveError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, TokensieveError):
            raise cause from None
        raise GraphRewriteError(f"graph pass failed: {type(cause).__name__}: {cause}") from e
