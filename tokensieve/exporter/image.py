"""Export an image model (timm, Hugging Face vision towers, an ONNX file): baseline graph, token-reduction passes,
staged bucket graphs for adaptive methods, and the artifact's manifest."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tokensieve.artifact.store import (
    Artifact,
    check_file,
    describe_io,
    save_baseline,
    save_graph,
    staged_directory,
    versions,
    write_manifest,
)
from tokensieve.errors import LocateError, MethodSpecError, SourceError
from tokensieve.exporter.verify import verify_export
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.builder import read_sites
from tokensieve.graph_passes.drop_zero_masks import DropZeroMaskPass
from tokensieve.graph_passes.lint import lint
from tokensieve.graph_passes.locate import ViTLayout, locate_vit
from tokensieve.graph_passes.macs import count_macs
from tokensieve.graph_passes.propagate import propagate_shapes
from tokensieve.graph_passes.restore import RESTORE_KEY
from tokensieve.graph_passes.token_reduction import TokenReductionPass
from tokensieve.manifest import ImageManifest, StagedManifest
from tokensieve.methods import Method, check_target, describe, schedule
from tokensieve.methods.base import for_layout
from tokensieve.onnx_file import load_onnx

if TYPE_CHECKING:
    from tokensieve.converters.sources import SourceSpec

logging.getLogger("onnxscript").setLevel(logging.ERROR)


@dataclass
class _Source:
    """The unreduced graph and what the manifest records about where it came from."""

    model: ir.Model
    digest: str | None  # SHA-256 of the eager weights (None for an ONNX file)
    preprocessing: dict[str, Any]  # input shape (without batch), mean, std
    built: Any | None  # the eager model (converters.sources.BuiltModel), None for an ONNX file
    reference: str | None = None  # an ONNX file's checkpoint beside it: the eager reference parity takes


def _baseline_from_source(
    spec, batch: int, dynamic_batch: bool, opset: int, exporter: str, module=None, pin: bool = False
):
    """The baseline ONNX graph of ``spec`` with what the manifest records about its source."""
    import torch

    from tokensieve.converters.export import export_onnx
    from tokensieve.converters.sources import BuiltModel, build_module, weights_digest

    if spec.kind == "onnx":
        return _foreign_baseline(spec, pin)
    built: BuiltModel = module if module is not None else build_module(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    example = torch.randn(max(batch, 2) if dynamic_batch else batch, *built.input_shape, generator=generator)
    model = export_onnx(
        built.module, example, built.output_names, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter
    )
    preprocessing = {"shape": list(built.input_shape), "mean": list(built.mean), "std": list(built.std)}
    return _Source(model, weights_digest(built.module), preprocessing, built)


def _foreign_baseline(spec, pin: bool):
    """An ONNX file's graph, its symbolic image axes pinned (always when ``pin``: a method needs a fixed token count),
    and the normalisation its exporter's files record (:mod:`tokensieve.converters.foreign`)."""
    from tokensieve.converters.foreign import pin_image_axes, read_beside
    from tokensieve.converters.sources import HALF

    model = load_onnx(spec.name, SourceError)
    beside = read_beside(spec.name)
    image = model.graph.inputs[0]
    if pin or spec.img_size or beside.size:
        pinned = pin_image_axes(list(image.shape or []), spec.img_size, beside, spec.name)
        if pinned is not None:
            image.shape = ir.Shape(pinned)
    propagate_shapes(model)
    shape = [d if isinstance(d, int) else None for d in model.graph.inputs[0].shape][1:]
    mean, std = (beside.mean, beside.std) if beside.mean else (list(HALF[0]), list(HALF[1]))
    return _Source(model, None, {"shape": shape, "mean": mean, "std": std}, None, beside.checkpoint)


def export_image(
    spec: SourceSpec,
    methods: list[Method],
    out: str | os.PathLike,
    *,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int = 18,
    exporter: str = "dynamo",
    specials: int | None = None,
    lint_target: str = "trt10.3",
    buckets: str | list[int] | None = None,
    max_buckets: int = 6,
    calibrate: str | os.PathLike | None = None,
    target_keep: float | None = None,
    allow_truncation: bool = False,
    restore_grid: bool | str = "auto",
    module=None,
) -> Artifact:
    """Export an image model ``spec`` with ``methods`` (ViT methods, validated together) to the artifact ``out``:
    one reduced graph, or for an adaptive method (``atp``) the staged bucket graphs (see
    :func:`tokensieve.exporter.dispatch.export` for the options). ``restore_grid``: rebuild the full token grid
    before every reader of a block output outside the blocks (True), never (False), or when a reader folds the
    tokens into a spatial grid (``"auto"``)."""
    check_target(methods, "vit")
    adaptive = any(getattr(m, "adaptive", False) for m in methods)
    if restore_grid not in (True, False, "auto"):
        raise MethodSpecError(f"restore_grid must be true, false or 'auto', got {restore_grid!r}")
    if adaptive and restore_grid is True:
        raise MethodSpecError(
            "--restore-grid is not supported with an adaptive method: its bucket graphs keep a data-dependent number "
            "of tokens; use a static-count method for models whose output is a map (docs/methods.md#dense-outputs)"
        )
    if adaptive and len(methods) > 1:
        raise MethodSpecError("an adaptive method (atp) cannot be combined with other methods yet")
    if not adaptive and (buckets or calibrate or target_keep is not None):
        raise MethodSpecError("--buckets, --calibrate and --target-keep apply to adaptive methods such as atp()")
    if batch < 1:
        raise SourceError(f"batch must be >= 1, got {batch}")
    source = _baseline_from_source(spec, batch, dynamic_batch or adaptive, opset, exporter, module, pin=bool(methods))
    baseline, preprocessing = source.model, source.preprocessing
    DropZeroMaskPass()(baseline)
    layout, locate_error = _locate(baseline, specials, methods)
    if layout is not None:
        methods = for_layout(methods, layout.specials)
    data = None
    if calibrate is not None:
        from tokensieve.exporter.staged import load_data

        data = load_data(calibrate, preprocessing["shape"], preprocessing["mean"], preprocessing["std"])
    staged_options = {
        "buckets": buckets,
        "max_buckets": max_buckets,
        "data": data,
        "target_keep": target_keep,
        "allow_truncation": allow_truncation,
        "lint_target": lint_target,
    }
    with staged_directory(out) as staging:
        graphs = _write_graphs(staging, baseline, methods, layout, adaptive, staged_options, restore_grid)
        batch_dim = graphs.reduced.graph.inputs[0].shape[0]
        specials = layout.specials if layout else None
        static = batch_dim if isinstance(batch_dim, int) else None
        restored = bool(_restored(graphs.reduced))
        verify_export(
            staging, graphs.files["model"], graphs.stages, graphs.methods, specials, source.built, static, restored
        )
        manifest = _manifest(spec, source, exporter, graphs, layout, locate_error, lint_target)
        write_manifest(staging, manifest)
    return Artifact.load(out)


@dataclass
class _Graphs:
    """What :func:`_write_graphs` wrote: the reduced graph, the manifest's graph table, the tokens entering each
    block, the (possibly calibrated) methods and the staged table of an adaptive method."""

    reduced: ir.Model
    files: dict[str, str]
    entering: list[int] | None
    methods: list[Method]
    stages: dict[str, Any] | None = None


def _locate(baseline: ir.Model, specials: int | None, methods: list[Method]) -> tuple[ViTLayout | None, str | None]:
    """The ViT layout (``None`` with the reason when it cannot be found and no method needs it); the methods'
    schedule is validated here, before anything is written."""
    try:
        layout = locate_vit(baseline, specials)
    except LocateError as e:
        if methods:
            raise
        return None, str(e)
    if methods:
        schedule(methods, layout.tokens, layout.specials, layout.depth)
    return layout, None


def _write_graphs(
    staging: Path,
    baseline: ir.Model,
    methods: list[Method],
    layout: ViTLayout | None,
    adaptive: bool,
    staged_options: dict[str, Any],
    restore: bool | str,
) -> _Graphs:
    """Write the unreduced, the reduced (``restore``: the grid option) or the staged graphs into ``staging``."""
    if not methods:
        save_graph(baseline, staging / "model.onnx", weights=True)
        entering = [layout.tokens] * layout.depth if layout else None
        return _Graphs(baseline, {"model": "model.onnx", "baseline": "model.onnx"}, entering, methods)
    if adaptive:
        from tokensieve.exporter.staged import build_staged

        save_baseline(staging, baseline)
        stages, calibrated = build_staged(staging, methods[0], layout, **staged_options)
        reduced = ir.load(staging / stages["padmax"])
        files = {"model": stages["padmax"], "baseline": "baseline.onnx"}
        return _Graphs(reduced, files, None, [calibrated], stages)
    reduced = save_baseline(staging, baseline)
    reduction = TokenReductionPass(methods, specials=layout.specials, restore=restore)
    run_passes(reduced, [reduction, RemoveUnusedNodesPass()])
    save_graph(reduced, staging / "model.onnx", weights=False)
    check_file(staging / "model.onnx")
    entering = schedule(methods, layout.tokens, layout.specials, layout.depth).entering
    return _Graphs(reduced, {"model": "model.onnx", "baseline": "baseline.onnx"}, entering, methods)


def _manifest(
    spec: SourceSpec,
    source: _Source,
    exporter: str,
    graphs: _Graphs,
    layout: ViTLayout | None,
    locate_error: str | None,
    lint_target: str,
) -> ImageManifest:
    """The image artifact's manifest: :class:`StagedManifest` for the bucket graphs of an adaptive method."""
    reduced, methods = graphs.reduced, graphs.methods
    inputs, outputs = describe_io(reduced)
    batch_dim = inputs[0]["shape"][0] if inputs and inputs[0]["shape"] else None
    macs_model, macs_baseline = count_macs(reduced), count_macs(source.model)
    common = {
        "versions": versions(),
        "source": spec.to_dict(),
        "weights_sha256": source.digest,
        "preprocessing": source.preprocessing,
        "export": {
            "exporter": exporter if spec.kind != "onnx" else "file",
            **({"reference": source.reference} if source.reference else {}),
            "opset": reduced.opset_imports.get(""),
            "batch": batch_dim if isinstance(batch_dim, int) else None,
            "dynamic_batch": not isinstance(batch_dim, int),
            **_restored(reduced),
        },
        "methods": [m.to_dict() for m in methods],
        "method_text": describe(methods),
        "graphs": {**graphs.files, "external_data": "weights.data"},
        "inputs": inputs,
        "outputs": outputs,
        "layout": layout.summary() if layout else None,
        "locate_error": locate_error,
        "tokens_per_block": {
            "baseline": [layout.tokens] * layout.depth if layout else None,
            "model": graphs.entering,
        },
        "sites": read_sites(reduced) if graphs.stages is None else [],
        "macs": {
            "baseline": macs_baseline,
            "model": macs_model,
            "limit_speedup": round(macs_baseline / macs_model, 4) if macs_model else None,
        },
        "lint": lint(reduced, lint_target).to_dict(),
    }
    if graphs.stages is None:
        return ImageManifest(**common)
    common["macs"]["expected"] = _expected_macs(graphs.stages)
    return StagedManifest(**common, stages=graphs.stages)


def _restored(reduced: ir.Model) -> dict[str, list[int]]:
    """``{"restore_grid": blocks}`` when the pass restored the grid after those blocks (nothing otherwise)."""
    blocks = json.loads(reduced.metadata_props.get(RESTORE_KEY, "[]"))
    return {"restore_grid": blocks} if blocks else {}


def _expected_macs(stages: dict) -> float | None:
    """Mean MACs per image over the calibration data through the bucketed chain (single decision site)."""
    plans = stages["calibration"].get("plans")
    if not plans or len(plans) != 1:
        return None
    stage1 = stages["graph_info"][stages["graphs"][""]]["macs"]
    return stage1 + plans[0]["expected_cost"]
