"""Method declarations: one small config dataclass per token-reduction method.

Each method has two faces that read the same dataclass: an eager PyTorch reference (``tokensieve.reference``) and
a graph pass (``tokensieve.graph_passes``). This package is pure Python (no torch, no onnx).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

from tokensieve.errors import MethodSpecError
from tokensieve.methods.spec import MethodCall, parse_method_call
from tokensieve.methods.topk import SiteCount, TopKPrune

Method = TopKPrune

REGISTRY: dict[str, type[Method]] = {"topk": TopKPrune}

__all__ = ["REGISTRY", "Method", "MethodCall", "SiteCount", "TopKPrune", "method_from_dict", "parse_method"]


def _build(name: str, kwargs: dict[str, Any]) -> Method:
    cls = REGISTRY.get(name)
    if cls is None:
        raise MethodSpecError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))} (or 'none')")
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise MethodSpecError(f"{name}: unknown argument(s) {unknown}; valid arguments: {allowed}")
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING]
    missing = [r for r in required if r not in kwargs]
    if missing:
        raise MethodSpecError(f"{name}: missing argument(s) {missing}, e.g. {name}(keep=0.7)")
    return cls(**kwargs)


def parse_method(text: str | None) -> Method | None:
    """Parse a method string (``"topk(keep=0.7, layers=[3,6,9])"``); ``None``/``""``/``"none"`` give ``None``."""
    call = parse_method_call(text) if text is not None else None
    return None if call is None else _build(call.name, call.kwargs)


def method_from_dict(data: dict[str, Any] | None) -> Method | None:
    """Inverse of ``Method.to_dict()`` (used to read manifests)."""
    if data is None:
        return None
    kwargs = {k: v for k, v in data.items() if k != "name"}
    if "keep" in kwargs:
        kwargs["keep"] = Fraction(kwargs["keep"])
    return _build(data["name"], kwargs)
