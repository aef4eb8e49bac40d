"""TensorRT engines for an artifact's graphs: build a serialized plan from one ONNX file and run it.

Optional: needs the ``tensorrt`` extra (``pip install 'tokensieve[tensorrt]'``) and an NVIDIA GPU; everything else in
tokensieve works without it, and this module imports TensorRT only when a build or a run starts. The building and
running go through Polygraphy's TensorRT backend (``NetworkFromOnnxPath`` -> ``CreateConfig`` ->
``EngineBytesFromNetwork``; ``TrtRunner`` on ``EngineFromBytes``), which owns the CUDA buffers and follows the
TensorRT API across versions.

Versions (docs/deploy.md#tensorrt-versions): TensorRT 10.x builds weakly typed networks, FP32 by default and FP16 on
request (``fp16=True``, the ``--fp16`` of trtexec); TensorRT 11 builds strongly typed networks only and has no
precision flags, so there the precision is the ONNX file's (FP16 comes from converting the ONNX first, e.g. with
``python -m modelopt.onnx.autocast``) and ``fp16=True`` is refused with that advice. An INT8 (QDQ) artifact from
``tokensieve quantize`` is explicit quantization: TensorRT 10.x builds its Q/DQ layers only with the INT8 builder
flag set (``int8=True``, trtexec's ``--int8``; the scales come from the graph, no calibrator), which may be combined
with ``fp16=True`` for the layers left in float (trtexec's ``--best``); TensorRT 11 reads the Q/DQ types without any
flag.

Written against Polygraphy's documented Python API (0.49-0.53) and TensorRT's; tokensieve's CI has neither a GPU nor
TensorRT, so these functions are exercised only on a machine that has both (``tests/test_tensorrt.py`` skips
elsewhere).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tokensieve.errors import RuntimeBackendError

Range = tuple[list[int], list[int], list[int]]  # min, opt, max shape of one input


def tensorrt_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the installed TensorRT Python package, ``None`` when it is not installed."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    import tensorrt

    major, minor = tensorrt.__version__.split(".")[:2]
    return int(major), int(minor)


def require_tensorrt() -> tuple[int, int]:
    version = tensorrt_version()
    if version is None:
        raise RuntimeBackendError(
            "TensorRT is not installed: building or running engines needs an NVIDIA GPU machine with "
            "`pip install 'tokensieve[tensorrt]'`; `tokensieve lint` checks TensorRT compatibility without it, and "
            "trt/build_*.sh in staged artifacts are trtexec recipes"
        )
    return version


def build_engine(onnx: Path, plan: Path, profile: Mapping[str, Range], fp16: bool = False, int8: bool = False) -> dict:
    """Build ``onnx`` (its external weights next to it) into the serialized engine ``plan`` (written to a temporary
    file, then renamed). ``profile`` gives each input with symbolic axes its min / opt / max shape (one optimization
    profile; empty for a static graph); ``int8``: the graph is QDQ-quantized (see the module docstring). Returns what
    was built: TensorRT version, typing, precision, profile."""
    version = require_tensorrt()
    strongly_typed = version[0] >= 11
    if fp16 and strongly_typed:
        raise RuntimeBackendError(
            f"TensorRT {version[0]}.{version[1]} has no precision flags (strongly typed networks only): convert the "
            "ONNX to FP16 first (python -m modelopt.onnx.autocast --onnx_path in.onnx --output_path out.onnx) or "
            "build FP32"
        )
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    network = NetworkFromOnnxPath(str(onnx), strongly_typed=strongly_typed or None)
    profiles = None
    if profile:
        shapes = Profile()
        for name, (low, opt, high) in profile.items():
            shapes.add(name, low, opt, high)
        profiles = [shapes]
    int8 = int8 and not strongly_typed  # a strongly typed network takes the INT8 types from the Q/DQ nodes
    config = CreateConfig(fp16=fp16 or None, int8=int8 or None, profiles=profiles)
    try:
        serialized = EngineBytesFromNetwork(network, config)()
    except Exception as e:  # Polygraphy reports parser and builder failures as its own exceptions
        raise RuntimeBackendError(f"TensorRT could not build {onnx.name}: {str(e).splitlines()[0]}") from e
    plan.parent.mkdir(parents=True, exist_ok=True)
    temporary = plan.with_name(plan.name + ".partial")
    temporary.write_bytes(bytes(serialized))
    os.replace(temporary, plan)
    return {
        "tensorrt": f"{version[0]}.{version[1]}",
        "strongly_typed": strongly_typed,
        "fp16": fp16,
        "int8_flag": int8,
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
        "bytes": plan.stat().st_size,
    }


def static_batch(shapes: list[list]) -> int | None:
    """The batch every input of an engine is fixed to, or None when any input's leading axis is dynamic (-1)."""
    leading = {shape[0] if shape else None for shape in shapes}
    if len(leading) != 1:
        return None
    batch = leading.pop()
    return batch if isinstance(batch, int) and batch > 0 else None


class TensorRTRunner:
    """Run one serialized engine (``plan``) with TensorRT through Polygraphy's ``TrtRunner``: the same ``run(feeds)
    -> {output: array}`` / ``input_names`` / ``active`` surface as :class:`tokensieve.runtimes.ort.OrtRunner`."""

    def __init__(self, plan: str | os.PathLike):
        self.path = Path(plan)
        if not self.path.is_file():
            raise RuntimeBackendError(
                f"no TensorRT engine at {self.path}; build the artifact's engines first: tokensieve build "
                f"{self.path.parent.parent}"
            )
        version = require_tensorrt()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self._runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.path))))
        try:
            self._runner.activate()
        except Exception as e:
            raise RuntimeBackendError(f"TensorRT cannot load {self.path.name}: {str(e).splitlines()[0]}") from e
        self.active = [f"TensorRT {version[0]}.{version[1]}"]
        metadata = self._runner.get_input_metadata()
        self.input_names = list(metadata.keys())
        self.static_batch = static_batch([list(meta.shape) for meta in metadata.values()])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for ``feeds``; an engine built for a fixed batch (a DLA engine) runs the images in chunks of
        that batch, the last one padded by repeating its last image, and returns exactly the images given."""
        images = len(next(iter(feeds.values())))
        step = self.static_batch
        if step is None or images == step:
            return self._infer(feeds)
        parts = []
        for start in range(0, images, step):
            chunk = {name: value[start : start + step] for name, value in feeds.items()}
            short = step - len(next(iter(chunk.values())))
            if short:
                chunk = {name: np.concatenate([v, np.repeat(v[-1:], short, 0)]) for name, v in chunk.items()}
            parts.append(self._infer(chunk))
        return {name: np.concatenate([part[name] for part in parts])[:images] for name in parts[0]}

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._runner.infer(dict(feeds))
        except Exception as e:
            raise RuntimeBackendError(f"TensorRT failed on {self.path.name}: {str(e).splitlines()[0]}") from e
        return {name: np.asarray(value) for name, value in outputs.items()}

    def close(self) -> None:
        self._runner.deactivate()
