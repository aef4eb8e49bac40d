"""Method grids: ``tome(r=[4,8,12,16])`` -> ``tome(r=4)``, ``tome(r=8)``, ... (one method string per strength).

Exactly one argument is the sweep axis: a list given to a parameter that takes a number (``r``, ``keep``,
``budget``), or a list of lists given to a parameter that takes a list (``layers=[[3], [3, 6]]``); a list given to
a list parameter (``layers=[3, 6, 9]``) is its value, as in ``--method``. The axis needs at least two values. Each
strength keeps the exact source text of its value (``keep=0.7`` stays ``0.7``).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass

from tokensieve.errors import MethodSpecError
from tokensieve.methods import REGISTRY

_LISTS = ("tuple", "list", "Sequence")


@dataclass(frozen=True)
class Strength:
    label: str  # "r=8"
    method: str  # "tome(r=8)"


def _takes_scalar(method: str, argument: str) -> bool:
    """Whether the declaration of ``method`` lets ``argument`` be a single value (unknown: yes)."""
    cls = REGISTRY.get(method)
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    if argument not in fields:
        return True
    annotation = str(fields[argument].type)
    parts = [p.strip() for p in annotation.split("|")]
    return any(p != "None" and not p.startswith(_LISTS) for p in parts)


def _axes(tree: ast.AST) -> list[tuple[str, ast.keyword]]:
    axes = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        for kw in node.keywords:
            value = kw.value
            if not isinstance(value, (ast.List, ast.Tuple)) or kw.arg is None:
                continue
            nested = all(isinstance(e, (ast.List, ast.Tuple)) for e in value.elts) and value.elts
            if _takes_scalar(node.func.id, kw.arg) or nested:
                axes.append((node.func.id, kw))
    return axes


def expand_grid(text: str) -> list[Strength]:
    """The strengths of a method grid (see the module docstring); a malformed grid is a :class:`MethodSpecError`."""
    text = " ".join(text.split())
    example = "e.g. 'tome(r=[4,8,12,16])'"
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise MethodSpecError(f"cannot parse method grid {text!r}: {e.msg}; expected {example}") from None
    axes = _axes(tree)
    if len(axes) != 1:
        named = ", ".join(f"{name}({kw.arg}=...)" for name, kw in axes)
        raise MethodSpecError(
            f"method grid {text!r} must have exactly one list-valued argument to sweep ({example}); "
            + (f"it has {len(axes)}: {named}" if axes else "it has none")
        )
    name, kw = axes[0]
    values = kw.value.elts
    if len(values) < 2:
        raise MethodSpecError(
            f"method grid {text!r}: {name}({kw.arg}=...) has {len(values)} value(s); a sweep needs 2+"
        )
    start, end = kw.value.col_offset, kw.value.end_col_offset
    strengths = []
    for value in values:
        segment = text[value.col_offset : value.end_col_offset].replace(" ", "")
        strengths.append(Strength(f"{kw.arg}={segment}", text[:start] + segment + text[end:]))
    return strengths
