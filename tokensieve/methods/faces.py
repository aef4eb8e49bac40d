"""The faces of a method that need heavy libraries, registered per method class where they are written.

A method's pure-Python declaration (this package) says what the method is; its graph rewrite, eager reference and
host-side decisions live in ``tokensieve.graph_passes``, ``tokensieve.reference`` and ``tokensieve.runtimes``, next
to the code they use. Each of those modules registers its face for the method class it implements::

    @register("export", FastV)
    def rewrite(graphs, method): ...

and the generic code (export, parity, bench, runtime) asks for it with ``Faces("tokensieve.graph_passes").lookup(
"export", method)``: the lookup imports every module of that package once (so a new module registers itself without
any list to edit) and walks the method's class hierarchy (a face registered for a base class serves its
subclasses; ``type(None)`` stands for "no method").

This module only uses the standard library; it names no other tokensieve package (the caller gives the package).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_MISSING: Any = object()
FACES: dict[str, dict[type, Any]] = {}


class MissingFaceError(LookupError):
    """A method has no registration for a face the generic code needs (a bug: every method declares them all)."""


def register(face: str, *classes: type) -> Callable[[T], T]:
    """Decorator: ``obj`` is ``face`` of every class in ``classes`` (and of their subclasses, unless they register
    their own)."""

    def decorate(obj: T) -> T:
        table = FACES.setdefault(face, {})
        for cls in classes:
            table[cls] = obj
        return obj

    return decorate


def lookup(face: str, method: object, default: Any = _MISSING) -> Any:
    """The ``face`` registered for ``method``'s class or its nearest base class (``default`` when none)."""
    table = FACES.get(face, {})
    for cls in type(method).__mro__:
        if cls in table:
            return table[cls]
    if default is not _MISSING:
        return default
    raise MissingFaceError(f"{type(method).__name__} has no {face!r} face; register one (see docs/adding-a-method.md)")


class Faces:
    """The faces one package registers: ``Faces("tokensieve.runtimes").lookup("prefill_cut", method)``."""

    def __init__(self, package: str):
        self.package = package
        self.loaded = False

    def load(self) -> None:
        """Import every module of the package (subpackages included), once: each registers its faces."""
        if self.loaded:
            return
        root = importlib.import_module(self.package)
        for info in pkgutil.walk_packages(root.__path__, f"{self.package}."):
            importlib.import_module(info.name)
        self.loaded = True

    def lookup(self, face: str, method: object, default: Any = _MISSING) -> Any:
        self.load()
        return lookup(face, method, default)

    def has(self, face: str, cls: type) -> bool:
        """Whether ``cls`` (or a base class) has ``face`` registered in any loaded package."""
        self.load()
        return any(c in FACES.get(face, {}) for c in cls.__mro__)
