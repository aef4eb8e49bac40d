"""Method declarations: one small config dataclass per token-reduction method.

Each method has two faces that read the same dataclass: an eager PyTorch reference (``tokensieve.reference``) and
a graph face (``tokensieve.graph_passes``). Several methods combine with ``+`` as long as they own disjoint blocks,
e.g. ``"topk(keep=0.7, layers=[3]) + tome(r=8, layers=[4,5,6,7,8,9,10,11])"``. Methods with ``target = "mllm"``
(``fastv``, ``atp_llava``, ``dyvte``, ``mustdrop``, ``globalcom2``, ``streamingllm``, ``snapkv``, ``a2sf``,
``h2o``) apply to MLLMs instead of ViT blocks (``globalcom2`` to LLaVA-NeXT's image tokens, ``mustdrop`` to LLaVA's
vision tower and decoder, the others to the decoder). This package is pure Python.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from tokensieve.errors import MethodSpecError
from tokensieve.methods.a2sf import A2SF
from tokensieve.methods.atp import ATPPrune
from tokensieve.methods.atp_llava import ATPLLaVA
from tokensieve.methods.base import Method, Schedule, SiteCount, check_target, schedule
from tokensieve.methods.decoder import DecoderContext, DecoderMethod
from tokensieve.methods.diffrate import DiffRate
from tokensieve.methods.dyvte import DyVTE
from tokensieve.methods.fastv import FastV
from tokensieve.methods.globalcom2 import GlobalCom2
from tokensieve.methods.h2o import H2O
from tokensieve.methods.mustdrop import MustDrop
from tokensieve.methods.pitome import PiToMe
from tokensieve.methods.snapkv import SnapKV
from tokensieve.methods.spec import parse_method_calls
from tokensieve.methods.streamingllm import StreamingLLM
from tokensieve.methods.tome import ToMe
from tokensieve.methods.topk import TopKPrune


def _discover() -> dict[str, type]:
    """Every method class of this package, by name: the dataclasses with a non-empty ``name`` defined in one of its
    modules (a new method module is found without editing a list)."""
    found: dict[str, type] = {}
    for info in pkgutil.iter_modules(__path__, f"{__name__}."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            named = isinstance(value, type) and isinstance(getattr(value, "name", None), str) and value.name
            if named and value.__module__ == module.__name__ and dataclasses.is_dataclass(value):
                found[value.name] = value
    return found


REGISTRY: dict[str, type] = _discover()
VIT_METHODS = tuple(cls for cls in REGISTRY.values() if getattr(cls, "target", "vit") == "vit")
MLLM_METHODS = tuple(cls for cls in REGISTRY.values() if issubclass(cls, DecoderMethod))

__all__ = [
    "A2SF",
    "H2O",
    "REGISTRY",
    "ATPLLaVA",
    "ATPPrune",
    "DecoderContext",
    "DecoderMethod",
    "DiffRate",
    "DyVTE",
    "FastV",
    "GlobalCom2",
    "Method",
    "MustDrop",
    "PiToMe",
    "Schedule",
    "SiteCount",
    "SnapKV",
    "StreamingLLM",
    "ToMe",
    "TopKPrune",
    "check_target",
    "describe",
    "methods_from_dicts",
    "parse_methods",
    "schedule",
]


def _build(name: str, kwargs: dict[str, Any]) -> Method:
    cls = REGISTRY.get(name)
    if cls is None:
        raise MethodSpecError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))} (or 'none')")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    allowed = [f.name for f in fields]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise MethodSpecError(f"{name}: unknown argument(s) {unknown}; valid arguments: {allowed}")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise MethodSpecError(f"{name}: missing argument(s) {missing}")
    return cls(**kwargs)


def parse_methods(text: str | None) -> list[Method]:
    """Parse a method string; ``None``/``""``/``"none"`` give ``[]``."""
    return [_build(call.name, call.kwargs) for call in parse_method_calls(text)]


def describe(methods: Sequence[Method]) -> str:
    return " + ".join(m.describe() for m in methods) or "none"


FRACTIONS = ("keep", "forgetting_factor", "retention", "temperature", "key_ratio")  # exact, stored as strings


def methods_from_dicts(data: Sequence[dict[str, Any]] | None) -> list[Method]:
    """Inverse of ``[m.to_dict() for m in methods]`` (used to read manifests)."""
    methods = []
    for entry in data or []:
        kwargs = {k: v for k, v in entry.items() if k != "name"}
        for key in FRACTIONS:
            if key in kwargs:
                kwargs[key] = Fraction(kwargs[key])
        methods.append(_build(entry["name"], kwargs))
    return methods
