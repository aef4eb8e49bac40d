"""torch ``nn.Module`` -> ONNX (as an ``onnx_ir.Model`` with every value's shape annotated).

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) is the default; the legacy TorchScript exporter is
available for comparison and for users whose models only export that way. Shapes are static by default (what
TensorRT, Jetson and DLA want); ``dynamic_batch`` makes only the batch axis symbolic.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence

import onnx
import onnx_ir as ir
import torch
from torch import nn

from tokensieve.errors import ExportError
from tokensieve.graph_passes.propagate import propagate_shapes

EXPORTERS = ("dynamo", "legacy")
INPUT_NAME = "pixel_values"


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    output_names: Sequence[str],
    *,
    opset: int = 18,
    dynamic_batch: bool = False,
    exporter: str = "dynamo",
) -> ir.Model:
    """Export ``module(example)`` to ONNX; input is named ``pixel_values``, outputs ``output_names``."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    if exporter == "legacy" and opset > 20:
        raise ExportError(f"the legacy exporter supports opset <= 20, got {opset}")
    module = module.eval()
    sink = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
                program = torch.onnx.export(
                    module,
                    (example,),
                    dynamo=True,
                    opset_version=opset,
                    dynamic_shapes=dynamic,
                    verbose=False,
                )
                model = program.model
                model.graph.inputs[0].name = INPUT_NAME
                for value, name in zip(model.graph.outputs, output_names, strict=False):
                    value.name = name
            else:
                buffer = io.BytesIO()
                torch.onnx.export(
                    module,
                    (example,),
                    buffer,
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=list(output_names),
                    dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *output_names]} if dynamic_batch else None,
                )
                model = ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))
    except Exception as e:  # the exporters raise a wide variety of types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx export ({exporter}, opset {opset}) failed: {first}") from e
    propagate_shapes(model)
    return model
