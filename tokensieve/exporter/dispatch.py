"""``export``: read the source and the method string, then hand over to the exporter of the source's kind (an MLLM
to :mod:`tokensieve.exporter.mllm`, an image model to :mod:`tokensieve.exporter.image`)."""

from __future__ import annotations

import inspect
import os
from typing import Any

from tokensieve.artifact.store import Artifact
from tokensieve.errors import MethodSpecError
from tokensieve.exporter.image import export_image
from tokensieve.methods import REGISTRY, Method, check_target, parse_methods


def export(
    source: str,
    method: str | Method | list[Method] | None = None,
    out: str | os.PathLike = "tokensieve-out",
    *,
    weights: str | None = None,
    seed: int = 0,
    img_size: int | None = None,
    capacity: int | None = None,
    growing_cache: bool = True,
    opset: int = 18,
    lint_target: str = "trt10.3",
    **options,
) -> Artifact:
    """Export ``source`` to ONNX, insert ``method`` into the graph, and write an artifact directory ``out``.

    ``source``: ``timm:NAME``, ``hf:PRESET`` / ``hf:PATH`` or a path to an ``.onnx`` file. ``method``: a method
    string such as ``"topk(keep=0.7, layers=[3,6,9])"`` or ``"tome(r=8)"`` (combine with ``+``), method objects, or
    ``None``/``"none"`` for the unreduced model in the same layout.

    Image models (:func:`tokensieve.exporter.image.export_image`) take ``batch``, ``dynamic_batch``, ``exporter``
    (``"dynamo"`` or ``"legacy"``), ``specials`` and, for adaptive methods (``atp``), a staged artifact: ``buckets`` =
    ``"auto"`` (chosen from the counts on ``calibrate`` data, at most ``max_buckets``) or a list of sizes;
    ``target_keep`` calibrates the threshold for a mean keep fraction; ``allow_truncation`` lets the dispatcher squeeze
    an over-full image into the largest bucket; ``module``: a prebuilt
    :class:`tokensieve.converters.sources.BuiltModel` to export instead of building ``source``.

    MLLM sources (``hf:llava-tiny``, ``hf:llava-next-tiny``, a local LLaVA / LLaVA-NeXT checkpoint) give a split
    artifact (vision, embed, prefill, decode graphs; see :mod:`tokensieve.exporter.mllm`): ``method`` = ``None`` or a
    decoder method (``"fastv(k=2, keep=0.5)"``), ``capacity`` = KV-cache slots of the static decode graph,
    ``growing_cache`` adds the growing-cache decode graph.
    """
    from tokensieve.converters.families import is_mllm_source
    from tokensieve.converters.sources import parse_source

    unknown = sorted(set(options) - set(inspect.signature(export_image).parameters) - {"spec", "methods", "out"})
    if unknown:
        raise TypeError(f"export() got unexpected keyword argument(s) {', '.join(unknown)}")
    spec = parse_source(source, weights=weights, seed=seed, img_size=img_size)
    methods = _methods(method)
    if spec.kind == "hf" and is_mllm_source(spec.name):
        from tokensieve.exporter.mllm import export_mllm

        check_target(methods, "mllm")
        if len(methods) > 1:
            raise MethodSpecError("an MLLM export takes one decoder method (e.g. 'fastv(k=2, keep=0.5)')")
        image_only = {  # options of image exports, refused for MLLM sources (grid buckets: Qwen-VL's vision)
            "--buckets": options.get("buckets") is not None and not _grids(options["buckets"]),
            "--calibrate": options.get("calibrate"),
            "--img-size": img_size,
            "--dynamic-batch": options.get("dynamic_batch"),
            "--batch": options.get("batch", 1) != 1,
            "--exporter": options.get("exporter", "dynamo") != "dynamo",
        }
        given = [flag for flag, value in image_only.items() if value]
        if given:
            raise MethodSpecError(
                f"{', '.join(given)} do not apply to MLLM exports; export with --out and optionally --method "
                "'fastv(...)', --capacity, --opset"
            )
        method = methods[0] if methods else None
        return export_mllm(
            spec,
            out,
            method=method,
            capacity=capacity,
            opset=opset,
            growing=growing_cache,
            lint_target=lint_target,
            buckets=options.get("buckets"),
        )
    if capacity is not None:
        raise MethodSpecError(
            "--capacity applies to MLLM sources (hf:llava-tiny, hf:internvl3-tiny, a checkpoint of an MLLM family)"
        )
    return export_image(spec, methods, out, opset=opset, lint_target=lint_target, **options)


def _grids(buckets: Any) -> bool:
    """Whether ``buckets`` are ``(rows, columns)`` grids (``--buckets 16x16,16x24``) rather than token counts."""
    return isinstance(buckets, list | tuple) and all(isinstance(b, list | tuple) for b in buckets)


def _methods(method: str | Method | list[Method] | None) -> list[Method]:
    """The method list from a method string, method objects or a mixed list of both."""
    if method is None or isinstance(method, str):
        return parse_methods(method)
    given = list(method) if isinstance(method, (list, tuple)) else [method]
    methods = [m for item in given for m in (parse_methods(item) if isinstance(item, str) else [item])]
    odd = [m for m in methods if not isinstance(m, tuple(REGISTRY.values()))]
    if odd:
        raise MethodSpecError(
            f"method must be a method string such as 'topk(keep=0.7)', a method object or a list of them; got "
            f"{odd[0]!r}"
        )
    return methods
