"""ONNX -> ONNX rewrites on onnx-ir (one pass per module) plus graph analyses (locate, lint, MACs).

This package never imports torch or ``tokensieve.reference``: it runs on a deployment box with only onnx,
onnx-ir, onnxscript and onnxruntime installed.
"""

from __future__ import annotations

import onnx_ir as ir

from tokensieve.errors import GraphRewriteError, MethodSpecError, TokensieveError
from tokensieve.methods import Method, TopKPrune


def method_pass(method: Method, specials: int | None = None) -> ir.passes.PassBase:
    """The graph pass that inserts ``method`` (its graph face)."""
    if isinstance(method, TopKPrune):
        from tokensieve.graph_passes.topk_prune import TopKPrunePass

        return TopKPrunePass(method, specials=specials)
    raise MethodSpecError(f"method {method.name!r} has no graph pass")


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> ir.passes.PassResult:
    """Run passes in order; a tokensieve error raised inside a pass surfaces as itself, not as a PassError."""
    try:
        return ir.passes.PassManager(passes)(model)
    except ir.passes.PassError as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, TokensieveError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise GraphRewriteError(f"graph pass failed: {e.__cause__ or e}") from e
