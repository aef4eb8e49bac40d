"""Safe parsing of method strings such as ``topk(keep=0.7, layers=[3,6,9])`` or ``topk(...) + tome(r=8)``.

The string is parsed with :mod:`ast` and only a single call with keyword arguments whose values are literals
(numbers, strings, booleans, None, lists/tuples of those; ``true``/``false``/``none`` in any case) is accepted.
Nothing is ever evaluated. Float literals are kept as their source text, so ``keep=0.7`` becomes exactly 7/10.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from tokensieve.errors import MethodSpecError


@dataclass(frozen=True)
class MethodCall:
    """A parsed method string: a name and its keyword arguments (literal values)."""

    name: str
    kwargs: dict[str, Any]


_NAMES = {"true": True, "false": False, "none": None, "null": None}


def _literal(node: ast.expr, text: str) -> Any:
    if isinstance(node, ast.Name) and node.id.lower() in _NAMES:  # true/false/none as typed on a command line
        return _NAMES[node.id.lower()]
    if isinstance(node, ast.Constant) and isinstance(node.value, float):
        # Keep the decimal text exactly (0.7 -> Fraction(7, 10)), never the binary double.
        return Fraction(ast.get_source_segment(text, node) or repr(node.value))
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand, text)
        if isinstance(value, (int, Fraction)) and not isinstance(value, bool):
            return -value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, text) for e in node.elts]
    segment = ast.get_source_segment(text, node)
    raise MethodSpecError(f"method argument {segment!r} is not a literal; use numbers, strings, lists or booleans")


def _call(node: ast.expr, text: str) -> MethodCall:
    if isinstance(node, ast.Name):
        return MethodCall(node.id, {})
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise MethodSpecError(f"method {text!r} must look like name(key=value, ...) [+ name(...)]")
    if node.args:
        raise MethodSpecError(f"method {text!r}: pass arguments by keyword, e.g. keep=0.7")
    kwargs: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise MethodSpecError(f"method {text!r}: '**' arguments are not allowed")
        if kw.arg in kwargs:
            raise MethodSpecError(f"method {text!r}: argument {kw.arg!r} given twice")
        kwargs[kw.arg] = _literal(kw.value, text)
    return MethodCall(node.func.id, kwargs)


def parse_method_calls(text: str | None) -> list[MethodCall]:
    """Parse ``name(key=value, ...) + name(...)``; ``""``, ``"none"`` or ``None`` give an empty list."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    text = text.strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise MethodSpecError(
            f"cannot parse method {text!r}: {e.msg}; expected e.g. 'topk(keep=0.7, layers=[3,6,9])'"
        ) from None
    terms, stack = [], [tree.body]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            stack.extend([node.right, node.left])
        else:
            terms.append(_call(node, text))
    return terms
