"""Python API: ``tokensieve.export(...)`` builds an artifact; ``tokensieve.load(DIR)`` opens one.

Data flow: model source -> converter (torch -> ONNX) -> normalising passes -> token-reduction pass -> artifact
(ONNX + manifest) -> runtime. The eager reference and parity sit beside it (``Artifact.parity``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tokensieve.artifact import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    Artifact,
    save_baseline,
    save_graph,
    staged_directory,
)
from tokensieve.errors import GraphRewriteError, LocateError, SourceError
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.builder import read_sites
from tokensieve.graph_passes.drop_zero_masks import DropZeroMaskPass
from tokensieve.graph_passes.lint import lint
from tokensieve.graph_passes.locate import ViTLayout, locate_vit
from tokensieve.graph_passes.macs import count_macs
from tokensieve.graph_passes.propagate import propagate_shapes
from tokensieve.graph_passes.token_reduction import TokenReductionPass
from tokensieve.methods import Method, describe, parse_methods, schedule

logging.getLogger("onnxscript").setLevel(logging.ERROR)

_VERSIONED = ("torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "timm", "transformers")


def _versions() -> dict[str, str]:
    out = {}
    for name in ("tokensieve", *_VERSIONED):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _io(model: ir.Model) -> tuple[list[dict], list[dict]]:
    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": v.dtype.name if v.dtype else None,
                "shape": [d if isinstance(d, int) else d.value for d in v.shape] if v.shape is not None else None,
            }
            for v in values
        ]

    return describe(model.graph.inputs), describe(model.graph.outputs)


def _check_file(path) -> None:
    """onnx's full checker (with strict shape inference) on the saved file, external weights included."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphRewriteError(f"the rewritten graph fails onnx's checker: {str(e).splitlines()[0]}") from e


def _baseline_from_source(spec, batch: int, dynamic_batch: bool, opset: int, exporter: str, module=None):
    """(baseline ONNX model, digest of the eager weights or None for ONNX sources)."""
    import torch

    from tokensieve.converters.export import export_onnx
    from tokensieve.converters.sources import BuiltModel, build_module, weights_digest

    if spec.kind == "onnx":
        model = ir.load(spec.name)
        propagate_shapes(model)
        return model, None
    built: BuiltModel = module if module is not None else build_module(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    example = torch.randn(max(batch, 2) if dynamic_batch else batch, *built.input_shape, generator=generator)
    model = export_onnx(
        built.module, example, built.output_names, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter
    )
    return model, weights_digest(built.module)


def export(
    source: str,
    method: str | Method | list[Method] | None = None,
    out: str | os.PathLike = "tokensieve-out",
    *,
    weights: str | None = None,
    seed: int = 0,
    img_size: int | None = None,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int = 18,
    exporter: str = "dynamo",
    specials: int | None = None,
    lint_target: str = "trt10.3",
    module=None,
) -> Artifact:
    """Export ``source`` to ONNX, insert ``method`` into the graph, and write an artifact directory ``out``.

    ``source``: ``timm:NAME``, ``hf:PRESET`` / ``hf:PATH`` or a path to an ``.onnx`` file. ``method``: a method
    string such as ``"topk(keep=0.7, layers=[3,6,9])"`` or ``"tome(r=8)"`` (combine with ``+``), method objects, or
    ``None``/``"none"`` for the unreduced
    model in the same layout. ``module``: a prebuilt :class:`tokensieve.converters.sources.BuiltModel` to export
    instead of building ``source`` (``source`` is then only recorded).
    """
    from tokensieve.converters.sources import parse_source

    spec = parse_source(source, weights=weights, seed=seed, img_size=img_size)
    if method is None or isinstance(method, str):
        methods = parse_methods(method)
    else:
        methods = list(method) if isinstance(method, (list, tuple)) else [method]
    if batch < 1:
        raise SourceError(f"batch must be >= 1, got {batch}")
    baseline, digest = _baseline_from_source(spec, batch, dynamic_batch, opset, exporter, module)
    DropZeroMaskPass()(baseline)
    layout: ViTLayout | None = None
    locate_error = None
    try:
        layout = locate_vit(baseline, specials)
    except LocateError as e:
        if methods:
            raise
        locate_error = str(e)
    if methods:
        schedule(methods, layout.tokens, layout.specials, layout.depth)  # fails early, before anything is written

    with staged_directory(out) as staging:
        if not methods:
            reduced = baseline
            save_graph(baseline, staging / "model.onnx", weights=True)
            graphs = {"model": "model.onnx", "baseline": "model.onnx"}
            entering = [layout.tokens] * layout.depth if layout else None
        else:
            reduced = save_baseline(staging, baseline)
            run_passes(reduced, [TokenReductionPass(methods, specials=layout.specials), RemoveUnusedNodesPass()])
            save_graph(reduced, staging / "model.onnx", weights=False)
            _check_file(staging / "model.onnx")
            graphs = {"model": "model.onnx", "baseline": "baseline.onnx"}
            entering = schedule(methods, layout.tokens, layout.specials, layout.depth).entering
        inputs, outputs = _io(reduced)
        batch_dim = inputs[0]["shape"][0] if inputs and inputs[0]["shape"] else None
        macs_model, macs_baseline = count_macs(reduced), count_macs(baseline)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "source": spec.to_dict(),
            "weights_sha256": digest,
            "export": {
                "exporter": exporter if spec.kind != "onnx" else "file",
                "opset": reduced.opset_imports.get(""),
                "batch": batch_dim if isinstance(batch_dim, int) else None,
                "dynamic_batch": not isinstance(batch_dim, int),
            },
            "methods": [m.to_dict() for m in methods],
            "method_text": describe(methods),
            "graphs": {**graphs, "external_data": "weights.data"},
            "inputs": inputs,
            "outputs": outputs,
            "layout": layout.summary() if layout else None,
            "locate_error": locate_error,
            "tokens_per_block": {
                "baseline": [layout.tokens] * layout.depth if layout else None,
                "model": entering,
            },
            "sites": read_sites(reduced),
            "macs": {
                "baseline": macs_baseline,
                "model": macs_model,
                "limit_speedup": round(macs_baseline / macs_model, 4) if macs_model else None,
            },
            "lint": lint(reduced, lint_target).to_dict(),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Artifact.load(out)


def load(path: str | os.PathLike) -> Artifact:
    """Open an artifact directory written by :func:`export`."""
    return Artifact.load(path)
