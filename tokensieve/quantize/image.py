"""INT8 post-training quantization of an image-model artifact, with the token selection kept in float32.

``quantize_artifact(artifact, data, out)`` writes a new artifact whose ``model`` and ``baseline`` graphs are ONNX
Runtime's static quantization of the originals (``onnxruntime.quantization.quantize_static``) in the form TensorRT
consumes as explicit quantization (the only INT8 route in TensorRT 11, docs/deploy.md#tensorrt-versions):
``QuantizeLinear``/``DequantizeLinear`` pairs (QDQ), signed INT8, symmetric (zero point 0) activations and
weights, per-channel weights, on the inputs of ``MatMul`` / ``Gemm`` / ``Conv`` only (the transformer recipe:
LayerNorm, Softmax and GELU stay float). The scales come from ``data`` (MinMax, Entropy or Percentile calibration).

Every node a reduction site inserted (metadata ``tokensieve.site``: the attention-score row, ``TopK``, the
gathers, the merge matrices) is excluded, so the scores are computed and compared in float32 from the quantized
stream: what can still flip a selection is the drift of the stream itself, and that is what parity measures.

A staged (bucketed) artifact has every graph quantized, each calibrated on its own inputs
(:mod:`tokensieve.quantize.staged`); its trtexec recipes gain ``--int8``.

The new artifact keeps its source, methods and eager reference; its manifest gains ``quantization`` (recipe,
calibration images, and the drift budget ``tolerance`` / ``min_agreement``). ``tokensieve parity`` holds it to the
same float32 eager reference with that budget instead of exact equality: outputs within ``tolerance`` of the output
scale, and at every site at least ``min_agreement`` of the original tokens in the same kept group in every sample.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tokensieve.errors import ArtifactError, InputError, first_line

CALIBRATIONS = ("minmax", "entropy", "percentile")
OP_TYPES = ("MatMul", "Gemm", "Conv")


def image_batches(input_name: str, data: np.ndarray, batch: int | None) -> list[dict[str, np.ndarray]]:
    """``data [N, C, H, W]`` as feeds of ``batch`` images (the graph's static batch; ``None``: 4 at a time, since
    calibration records every intermediate tensor); a last partial batch is left out."""
    step = batch or 4
    return [{input_name: data[start : start + step]} for start in range(0, len(data) - step + 1, step)]


def quantize_graph(source: Path, target: Path, feeds: list[dict[str, np.ndarray]], calibration: str) -> int:
    """QDQ-quantize ``source`` into ``target`` (weights inline, every value's shape inferred) calibrated on the
    ``feeds`` (one dict of input arrays per calibration call); returns the number of excluded site nodes."""
    import onnx_ir as ir
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    excluded = [node.name for node in ir.load(source).graph if "tokensieve.site" in node.metadata_props]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[calibration]
    muted = logging.root.manager.disable  # the quantizer logs advice on the root logger for every graph
    logging.disable(logging.WARNING)
    try:
        quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(OP_TYPES),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=method,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    except Exception as e:  # the quantizer raises whatever onnx / ONNX Runtime raised inside it
        raise ArtifactError(f"ONNX Runtime's quantizer failed on {source.name}: {first_line(e)}") from e
    finally:
        logging.disable(muted)
    import onnx  # the quantizer leaves the new Q/DQ outputs without shapes; static shapes are the contract

    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(target), strict_mode=True), target)
    return len(excluded)


def quantize_artifact(
    artifact,
    data: np.ndarray,
    out,
    *,
    calibration: str = "minmax",
    tolerance: float = 0.05,
    min_agreement: float = 0.9,
):
    """Write the INT8 artifact ``out`` from ``artifact`` (an image model, single-graph or staged) calibrated on
    ``data``; see the module docstring. Returns the new :class:`tokensieve.artifact.store.Artifact`."""
    from tokensieve.artifact.store import Artifact, staged_directory, write_manifest
    from tokensieve.graph_passes.lint import lint

    manifest = artifact.manifest
    if artifact.kind == "mllm":
        raise ArtifactError(
            "quantize takes an image-model artifact (single-graph or staged); MLLM artifacts are not supported yet"
        )
    if manifest.quantization is not None:
        raise ArtifactError(f"{artifact.path} is already quantized; quantize the float32 artifact it came from")
    if calibration not in CALIBRATIONS:
        raise InputError(f"unknown calibration {calibration!r}; choose one of {CALIBRATIONS}")
    if not (tolerance > 0 and 0 <= min_agreement <= 1):
        raise InputError("tolerance must be > 0 and min_agreement in [0, 1]")
    spec = manifest.inputs[0]
    batch = manifest.export["batch"]
    if data.ndim != 4 or list(data.shape[1:]) != list(spec["shape"][1:]):
        wanted = ", ".join(map(str, spec["shape"][1:]))
        raise InputError(f"calibration data has shape {list(data.shape)}; the graph takes [N, {wanted}]")
    if len(data) < (batch or 4) * 2:
        raise InputError(f"calibration needs at least {(batch or 4) * 2} images, got {len(data)}")
    data = np.ascontiguousarray(data, dtype=np.float32)
    images = image_batches(spec["name"], data, batch)
    feeds = {manifest.graphs[key]: images for key in ("model", "baseline")}
    if artifact.kind == "staged":
        from tokensieve.quantize.staged import stage_feeds

        feeds |= stage_feeds(artifact, images)
    with staged_directory(out) as staging:
        excluded = {}
        for path, batches in feeds.items():
            (staging / path).parent.mkdir(parents=True, exist_ok=True)
            excluded[path] = quantize_graph(artifact.path / path, staging / path, batches, calibration)
        for leftover in staging.rglob("*.onnx.data"):  # quantize_static writes weights inline; nothing else stays
            leftover.unlink()
        import onnx_ir as ir

        target = manifest.lint["target"]
        new = manifest.replace(graphs={key: manifest.graphs[key] for key in ("model", "baseline")})
        new.lint = lint(ir.load(staging / new.graphs["model"]), target).to_dict()
        if artifact.kind == "staged":
            from tokensieve.quantize.staged import restage

            restage(new.stages, staging, target)
        new.quantization = {
            "format": "QDQ",
            "dtype": "int8",
            "symmetric": True,
            "per_channel_weights": True,
            "op_types": list(OP_TYPES),
            "calibration": calibration,
            "images": len(data),
            "excluded_site_nodes": sum(excluded.values()),
            "tolerance": tolerance,
            "min_agreement": min_agreement,
            "source_artifact": str(artifact.path),
        }
        for name in ("bench", "golden"):
            new.extra.pop(name, None)
        write_manifest(staging, new)
    return Artifact.load(Path(out))
