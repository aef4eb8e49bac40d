"""tokensieve: export token-reduced transformers to ONNX / TensorRT with the reduction inside the graph.

Python API::

    import tokensieve
    art = tokensieve.export("timm:vit_base_patch16_224", "topk(keep=0.7, layers=[3,6,9])", "runs/vitb")
    print(art.parity().text())
"""

from tokensieve.api import export, load
from tokensieve.artifact import Artifact
from tokensieve.errors import TokensieveError

__version__ = "0.1.0"
__all__ = ["Artifact", "TokensieveError", "__version__", "export", "load"]
