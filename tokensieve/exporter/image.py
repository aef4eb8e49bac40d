"""Export an image model (timm, Hugging Face vision towers, an ONNX file): baseline graph, token-reduction passes,
staged bucket graphs for adaptive methods, and the artifact's manifest."""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tokensieve.artifact.store import (
    FORMAT,
    FORMAT_VERSION,
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
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.builder import read_sites
from tokensieve.graph_passes.drop_zero_masks import DropZeroMaskPass
from tokensieve.graph_passes.lint import lint
from tokensieve.graph_passes.locate import ViTLayout, locate_vit
from tokensieve.graph_passes.macs import count_macs
from tokensieve.graph_passes.propagate import propagate_shapes
from tokensieve.graph_passes.token_reduction import TokenReductionPass
from tokensieve.methods import REGISTRY, Method, check_target, describe, parse_methods, schedule
from tokensieve.onnx_file import load_onnx

logging.getLogger("onnxscript").setLevel(logging.ERROR)


def _baseline_from_source(spec, batch: int, dynamic_batch: bool, opset: int, exporter: str, module=None):
    """(baseline ONNX model, digest of the eager weights or None, input preprocessing {shape, mean, std})."""
    import torch

    from tokensieve.converters.export import export_onnx
    from tokensieve.converters.sources import HALF, BuiltModel, build_module, weights_digest

    if spec.kind == "onnx":
        model = load_onnx(spec.name, SourceError)
        propagate_shapes(model)
        shape = [d if isinstance(d, int) else None for d in model.graph.inputs[0].shape][1:]
        return model, None, {"shape": shape, "mean": list(HALF[0]), "std": list(HALF[1])}
    built: BuiltModel = module if module is not None else build_module(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    example = torch.randn(max(batch, 2) if dynamic_batch else batch, *built.input_shape, generator=generator)
    model = export_onnx(
        built.module, example, built.output_names, opset=opset, dynamic_batch=dynamic_batch, exporter=exporter
    )
    preprocessing = {"shape": list(built.input_shape), "mean": list(built.mean), "std": list(built.std)}
    return model, weights_digest(built.module), preprocessing


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
    buckets: str | list[int] | None = None,
    max_buckets: int = 6,
    calibrate: str | os.PathLike | None = None,
    target_keep: float | None = None,
    allow_truncation: bool = False,
    capacity: int | None = None,
    growing_cache: bool = True,
    module=None,
) -> Artifact:
    """Export ``source`` to ONNX, insert ``method`` into the graph, and write an artifact directory ``out``.

    ``source``: ``timm:NAME``, ``hf:PRESET`` / ``hf:PATH`` or a path to an ``.onnx`` file. ``method``: a method
    string such as ``"topk(keep=0.7, layers=[3,6,9])"`` or ``"tome(r=8)"`` (combine with ``+``), method objects, or
    ``None``/``"none"`` for the unreduced model in the same layout. ``module``: a prebuilt
    :class:`tokensieve.converters.sources.BuiltModel` to export instead of building ``source``.

    Adaptive methods (``atp``) produce a staged artifact: ``buckets`` = ``"auto"`` (chosen from the counts on
    ``calibrate`` data, at most ``max_buckets``) or a list of sizes; ``target_keep`` calibrates the threshold for a
    mean keep fraction; ``allow_truncation`` lets the dispatcher squeeze an over-full image into the largest bucket.
    The batch axis is made dynamic for them (the dispatcher runs groups of any size).

    MLLM sources (``hf:llava-tiny``, ``hf:llava-next-tiny``, a local LLaVA / LLaVA-NeXT checkpoint) give a split
    artifact (vision, embed, prefill, decode graphs; see :mod:`tokensieve.exporter.mllm`): ``method`` = ``None`` or a
    decoder method (``"fastv(k=2, keep=0.5)"``), ``capacity`` = KV-cache slots of the static decode graph,
    ``growing_cache`` adds the growing-cache decode graph.
    """
    from tokensieve.converters.llava import is_mllm_source
    from tokensieve.converters.sources import parse_source

    spec = parse_source(source, weights=weights, seed=seed, img_size=img_size)
    if method is None or isinstance(method, str):
        methods = parse_methods(method)
    else:
        given = list(method) if isinstance(method, (list, tuple)) else [method]
        methods = [m for item in given for m in (parse_methods(item) if isinstance(item, str) else [item])]
        odd = [m for m in methods if not isinstance(m, tuple(REGISTRY.values()))]
        if odd:
            raise MethodSpecError(
                f"method must be a method string such as 'topk(keep=0.7)', a method object or a list of them; got "
                f"{odd[0]!r}"
            )
    if spec.kind == "hf" and is_mllm_source(spec.name):
        from tokensieve.exporter.mllm import export_mllm

        check_target(methods, "mllm")
        if len(methods) > 1:
            raise MethodSpecError("an MLLM export takes one decoder method (e.g. 'fastv(k=2, keep=0.5)')")
        unsupported = {
            "--buckets": buckets,
            "--calibrate": calibrate,
            "--img-size": img_size,
            "--dynamic-batch": dynamic_batch,
            "--batch": batch != 1,
            "--exporter": exporter != "dynamo",
        }
        given = [flag for flag, value in unsupported.items() if value]
        if given:
            raise MethodSpecError(
                f"{', '.join(given)} do not apply to MLLM exports; export with --out and optionally --method "
                "'fastv(...)', --capacity, --opset"
            )
        return export_mllm(
            spec,
            out,
            method=methods[0] if methods else None,
            capacity=capacity,
            opset=opset,
            growing=growing_cache,
            lint_target=lint_target,
        )
    if capacity is not None:
        raise MethodSpecError("--capacity applies to MLLM sources (hf:llava-tiny, a LLaVA checkpoint)")
    check_target(methods, "vit")
    adaptive = any(getattr(m, "adaptive", False) for m in methods)
    if adaptive and len(methods) > 1:
        raise MethodSpecError("an adaptive method (atp) cannot be combined with other methods yet")
    if not adaptive and (buckets or calibrate or target_keep is not None):
        raise MethodSpecError("--buckets, --calibrate and --target-keep apply to adaptive methods such as atp()")
    if batch < 1:
        raise SourceError(f"batch must be >= 1, got {batch}")
    baseline, digest, preprocessing = _baseline_from_source(
        spec, batch, dynamic_batch or adaptive, opset, exporter, module
    )
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
    data = None
    if calibrate is not None:
        from tokensieve.exporter.staged import load_data

        data = load_data(calibrate, preprocessing["shape"], preprocessing["mean"], preprocessing["std"])

    stages = None
    with staged_directory(out) as staging:
        if not methods:
            reduced = baseline
            save_graph(baseline, staging / "model.onnx", weights=True)
            graphs = {"model": "model.onnx", "baseline": "model.onnx"}
            entering = [layout.tokens] * layout.depth if layout else None
        elif adaptive:
            from tokensieve.exporter.staged import build_staged

            save_baseline(staging, baseline)
            stages, calibrated = build_staged(
                staging,
                methods[0],
                layout,
                buckets=buckets,
                max_buckets=max_buckets,
                data=data,
                target_keep=target_keep,
                allow_truncation=allow_truncation,
                lint_target=lint_target,
            )
            methods = [calibrated]
            reduced = ir.load(staging / stages["padmax"])
            graphs = {"model": stages["padmax"], "baseline": "baseline.onnx"}
            entering = None
        else:
            reduced = save_baseline(staging, baseline)
            run_passes(reduced, [TokenReductionPass(methods, specials=layout.specials), RemoveUnusedNodesPass()])
            save_graph(reduced, staging / "model.onnx", weights=False)
            check_file(staging / "model.onnx")
            graphs = {"model": "model.onnx", "baseline": "baseline.onnx"}
            entering = schedule(methods, layout.tokens, layout.specials, layout.depth).entering
        inputs, outputs = describe_io(reduced)
        batch_dim = inputs[0]["shape"][0] if inputs and inputs[0]["shape"] else None
        macs_model, macs_baseline = count_macs(reduced), count_macs(baseline)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "source": spec.to_dict(),
            "weights_sha256": digest,
            "preprocessing": preprocessing,
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
            "sites": read_sites(reduced) if not adaptive else [],
            "macs": {
                "baseline": macs_baseline,
                "model": macs_model,
                "limit_speedup": round(macs_baseline / macs_model, 4) if macs_model else None,
            },
            "lint": lint(reduced, lint_target).to_dict(),
        }
        if stages is not None:
            manifest["stages"] = stages
            manifest["macs"]["expected"] = _expected_macs(stages)
        write_manifest(staging, manifest)
    return Artifact.load(out)


def _expected_macs(stages: dict) -> float | None:
    """Mean MACs per image over the calibration data through the bucketed chain (single decision site)."""
    plans = stages["calibration"].get("plans")
    if not plans or len(plans) != 1:
        return None
    stage1 = stages["graph_info"][stages["graphs"][""]]["macs"]
    return stage1 + plans[0]["expected_cost"]
