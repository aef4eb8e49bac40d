"""tokensieve: export token-reduced transformers to ONNX / TensorRT with the reduction inside the graph.

Python API::

    import tokensieve
    art = tokensieve.export("timm:vit_base_patch16_224", "topk(keep=0.7, layers=[3,6,9])", "runs/vitb")
    print(art.parity().text())

The API imports lazily, so the torch- and onnx-free parts (``tokensieve.runtimes.buckets``, which the Triton router
runs) import without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tokensieve.errors import TokensieveError

if TYPE_CHECKING:
    from tokensieve.api import Artifact, export, load, sweep

__version__ = "0.1.0"
__all__ = ["Artifact", "TokensieveError", "__version__", "export", "load", "sweep"]
_LAZY = {"export": "tokensieve.api", "load": "tokensieve.api", "Artifact": "tokensieve.api", "sweep": "tokensieve.api"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokensieve' has no attribute {name!r}")
