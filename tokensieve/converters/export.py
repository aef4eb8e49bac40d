"""torch ``nn.Module`` -> ONNX (as an ``onnx_ir.Model`` with every value's shape annotated).

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) is the default; the legacy TorchScript exporter is
available for comparison and for users whose models only export that way. Shapes are static by default (what
TensorRT, Jetson and DLA want); ``dynamic_batch`` makes only the batch axis symbolic.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import onnx
import onnx_ir as ir
import torch
from torch import nn

from tokensieve.errors import ExportError, first_line
from tokensieve.graph_passes.propagate import propagate_shapes

EXPORTERS = ("dynamo", "legacy")
INPUT_NAME = "pixel_values"


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    *,
    opset: int = 18,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    exporter: str = "dynamo",
) -> ir.Model:
    """Export ``module(*args)`` to ONNX with the given I/O names (flattened: an argument that is a tuple of tensors
    gives one graph input per tensor); ``dynamic_axes`` = ``{input: {axis: symbol}}``, a symbol shared between
    inputs is one dimension, ``k*symbol`` is ``k`` times it (dynamo)."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    if exporter == "legacy" and not 14 <= opset <= 20:
        raise ExportError(f"opset {opset}: tokensieve exports opset 14-20 with the legacy exporter")
    if exporter == "dynamo" and opset < 18:  # torch would silently write opset 18 instead
        raise ExportError(f"opset {opset}: the dynamo exporter writes opset >= 18; use the legacy exporter for 14-17")
    module = module.eval()
    dynamic_axes = dynamic_axes or {}
    sink = io.StringIO()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                shapes = _dynamic_shapes(args, iter(input_names), dynamic_axes, {}) if dynamic_axes else None
                program = torch.onnx.export(
                    module, args, dynamo=True, opset_version=opset, dynamic_shapes=shapes, verbose=False
                )
                model = program.model
                for value, name in zip(model.graph.inputs, input_names, strict=False):
                    value.name = name
                for value, name in zip(model.graph.outputs, output_names, strict=False):
                    value.name = name
            else:
                buffer = io.BytesIO()
                axes = {name: dict(axes) for name, axes in dynamic_axes.items()}
                torch.onnx.export(
                    module,
                    args,
                    buffer,
                    dynamo=False,
                    opset_version=opset,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes=axes or None,
                )
                model = ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))
    except Exception as e:  # the exporters raise a wide variety of types
        first = first_line(e)
        hint = "; the default dynamo exporter may support it" if exporter == "legacy" else ""
        raise ExportError(f"torch.onnx export ({exporter}, opset {opset}) failed: {first}{hint}") from e
    propagate_shapes(model)
    return model


def _dynamic_shapes(args, names: Iterator[str], axes: dict[str, dict[int, str]], dims: dict[str, Any]) -> tuple:
    """torch.export ``dynamic_shapes`` mirroring ``args`` (tuples of tensors stand for ``*args`` parameters)."""
    specs = []
    for arg in args:
        if isinstance(arg, tuple | list):
            specs.append(_dynamic_shapes(arg, names, axes, dims))
            continue
        wanted = axes.get(next(names), {})
        specs.append({axis: _dim(symbol, dims) for axis, symbol in wanted.items()} or None)
    return tuple(specs)


def _dim(symbol: str, dims: dict[str, Any]) -> Any:
    """The torch.export dimension of ``name``, or of ``k*name`` (``k`` times another symbolic dimension)."""
    factor, _, name = symbol.rpartition("*")
    dim = dims.setdefault(name, torch.export.Dim(name, min=1, max=1 << 16))
    return int(factor) * dim if factor else dim


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    output_names: Sequence[str],
    *,
    opset: int = 18,
    dynamic_batch: bool = False,
    exporter: str = "dynamo",
) -> ir.Model:
    """Export an image model ``module(example)``: input ``pixel_values``, outputs ``output_names``."""
    axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}} if dynamic_batch else None
    if axes and exporter == "dynamo":
        axes = {INPUT_NAME: {0: "batch"}}
    return export_graph(
        module, (example,), [INPUT_NAME], output_names, opset=opset, dynamic_axes=axes, exporter=exporter
    )
