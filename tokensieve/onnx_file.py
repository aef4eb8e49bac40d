"""Reading an ONNX file a user or an artifact names: a corrupt, truncated or empty file is one typed error naming it,
never a protobuf traceback (an empty file even parses, as a model without a graph)."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from tokensieve.errors import ArtifactError, TokensieveError, first_line


def load_onnx(path: str | Path, error: type[TokensieveError] = ArtifactError) -> ir.Model:
    """The model at ``path``; ``error`` (default :class:`ArtifactError`) if it is not a readable ONNX graph."""
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf DecodeError, onnx-ir's IndexError on an empty file, ...
        reason = first_line(e)
        raise error(f"{path} is not a readable ONNX model ({reason}); re-export it or check the file") from None
    if len(model.graph) == 0 or not model.graph.outputs:
        raise error(f"{path} holds no ONNX graph (no nodes or no outputs: an empty or non-ONNX file)")
    return model
