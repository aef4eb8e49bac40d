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

FP32 engines on TensorRT 10.x are built with TF32 tactics allowed (``tf32=True``): Polygraphy's ``CreateConfig``
clears TF32 unless asked, while trtexec keeps it on, so without the flag the same "FP32" would mean two different
engines; ``build.json`` records ``tf32`` either way.

Polygraphy's TensorRT runner returns its outputs in host buffers it reuses on the next ``infer`` call, so every
output is copied before another call. An engine's input shapes come from the engine (``-1`` for a dynamic axis); the
batch an engine takes comes from its optimization profile (``get_tensor_profile_shape``), so an engine built for a
fixed batch (a DLA engine: min = opt = max) runs any number of images in chunks of that batch.

Written against Polygraphy's documented Python API (0.50.3 and later: earlier releases read
``ILayer.precision_is_set``, which TensorRT 11 removed) and TensorRT's; tokensieve's CI has neither a GPU nor
TensorRT, so these functions are exercised on a machine that has both (``tests/test_tensorrt.py`` runs them against
stand-ins elsewhere).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.errors import RuntimeBackendError, first_line

Range = tuple[list[int], list[int], list[int]]  # min, opt, max shape of one input
POLYGRAPHY_FLOOR = (0, 50, 3)  # the first release that guards ILayer.precision_is_set (gone in TensorRT 11)


def check_polygraphy(tensorrt: tuple[int, int]) -> None:
    """Refuse a Polygraphy release older than :data:`POLYGRAPHY_FLOOR`, which fails on TensorRT 11 networks."""
    import polygraphy

    parts = []
    for part in polygraphy.__version__.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    if tuple(parts) < POLYGRAPHY_FLOOR:
        floor = ".".join(map(str, POLYGRAPHY_FLOOR))
        raise RuntimeBackendError(
            f"Polygraphy {polygraphy.__version__} reads ILayer.precision_is_set, which TensorRT {tensorrt[0]}."
            f"{tensorrt[1]} may not have; upgrade it: pip install 'polygraphy>={floor}'"
        )


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
    check_polygraphy(version)
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
    tf32 = not strongly_typed  # trtexec's default; Polygraphy's is off (see the module docstring)
    config = CreateConfig(fp16=fp16 or None, int8=int8 or None, tf32=tf32 or None, profiles=profiles)
    try:
        serialized = EngineBytesFromNetwork(network, config)()
    except Exception as e:  # Polygraphy reports parser and builder failures as its own exceptions
        raise RuntimeBackendError(f"TensorRT could not build {onnx.name}: {first_line(e)}") from e
    plan.parent.mkdir(parents=True, exist_ok=True)
    temporary = plan.with_name(plan.name + ".partial")
    temporary.write_bytes(bytes(serialized))
    os.replace(temporary, plan)
    return {
        "tensorrt": f"{version[0]}.{version[1]}",
        "strongly_typed": strongly_typed,
        "fp16": fp16,
        "tf32": tf32 if not strongly_typed else None,  # TensorRT 11: the network's types decide
        "int8_flag": int8,
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
        "bytes": plan.stat().st_size,
    }


def batch_range(engine, metadata: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(min, max)`` batch of an engine's first optimization profile: an input's leading axis as the engine states
    it, or, where that is dynamic (-1), as the profile bounds it (``get_tensor_profile_shape``); None when the inputs
    disagree or have no batch axis."""
    ranges = set()
    for name, meta in metadata.items():
        shape = list(meta.shape)
        if not shape:
            return None
        if isinstance(shape[0], int) and shape[0] > 0:
            ranges.add((shape[0], shape[0]))
            continue
        low, _, high = engine.get_tensor_profile_shape(name, 0)
        ranges.add((int(low[0]), int(high[0])))
    return ranges.pop() if len(ranges) == 1 else None


def run_in_chunks(
    infer: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    feeds: Mapping[str, np.ndarray],
    low: int,
    high: int,
) -> dict[str, np.ndarray]:
    """``infer`` on ``feeds`` in chunks of at most ``high`` images, a chunk short of ``low`` padded by repeating its
    last image; exactly the images given come back."""
    images = len(next(iter(feeds.values())))
    if low <= images <= high:
        return infer(dict(feeds))
    parts = []
    for start in range(0, images, high):
        chunk = {name: value[start : start + high] for name, value in feeds.items()}
        short = low - len(next(iter(chunk.values())))
        if short > 0:
            chunk = {name: np.concatenate([v, np.repeat(v[-1:], short, 0)]) for name, v in chunk.items()}
        parts.append(infer(chunk))
    return {name: np.concatenate([part[name] for part in parts])[:images] for name in parts[0]}


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
            raise RuntimeBackendError(f"TensorRT cannot load {self.path.name}: {first_line(e)}") from e
        self.active = [f"TensorRT {version[0]}.{version[1]}"]
        metadata = self._runner.get_input_metadata()
        self.input_names = list(metadata.keys())
        self.batches = batch_range(self._runner.engine, metadata)
        fixed = self.batches is not None and self.batches[0] == self.batches[1]
        self.static_batch = self.batches[0] if fixed else None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for ``feeds``; more images than the engine's profile takes (a DLA engine: exactly its fixed
        batch) run in chunks, the last one padded by repeating its last image, and exactly the images given come
        back."""
        if self.batches is None:
            return self._infer(feeds)
        return run_in_chunks(self._infer, feeds, *self.batches)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outputs = self._runner.infer(dict(feeds))
        except Exception as e:
            raise RuntimeBackendError(f"TensorRT failed on {self.path.name}: {first_line(e)}") from e
        # Polygraphy hands back views of host buffers it overwrites on the next call: copy them
        return {name: np.array(value, copy=True) for name, value in outputs.items()}

    def close(self) -> None:
        self._runner.deactivate()
