"""ONNX Runtime runner: the embedded default runtime.

Reports which execution provider really runs the graph: ``onnxruntime-gpu`` falls back to the CPU silently when
CUDA or TensorRT libraries are missing, so the runner compares the providers it asked for with the ones the session
registered, and raises when ``require`` is set and a requested provider is absent.

``extra_outputs`` exposes intermediate values (e.g. the kept-token indices a pruning site names
``tokensieve/site<k>/kept``) as additional outputs without writing a second model file.

``weights`` (a :class:`SharedWeights`) gives all the sessions of an artifact one copy of its weights. Every graph of an
artifact stores its weights in the same ``weights.data``; the runtime memory-maps that file once and hands each
session its initializers as views of the map (``SessionOptions.add_initializer`` uses the buffer as it is, so
nothing is copied and nothing is read at load: the pages are the operating system's file cache, loaded when first
touched). Such sessions do not prepack: MLAS would otherwise copy every MatMul weight into a private packed layout
per session (and spend seconds of start-up on it); the packing then happens per call, a small cost next to the
product itself (``benchmarks/bench_llava_memory.py`` measures start-up, speed and peak RSS both ways). Letting
ONNX Runtime map the external file per session instead would also keep one physical copy, but each mapping counts
again in the process's resident size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from tokensieve.errors import ArtifactError, RuntimeBackendError, first_line
from tokensieve.onnx_file import load_onnx

_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


def _with_outputs(path: Path, names: Sequence[str]) -> bytes:
    model = load_onnx(path, RuntimeBackendError)
    values = {v.name: v for node in model.graph for v in node.outputs}
    for name in names:
        if name not in values:
            raise RuntimeBackendError(f"{path.name} has no value named {name!r} to expose as an output")
        if values[name] not in model.graph.outputs:
            model.graph.outputs.append(values[name])
    return ir.serde.serialize_model(model).SerializeToString()


class SharedWeights:
    """One read-only memory map of an artifact's weights file and one ``OrtValue`` view per tensor in it, handed to
    every session whose graph keeps its initializers there."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise ArtifactError(f"weights file {self.path} does not exist; re-export the artifact")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._values: dict[tuple, ort.OrtValue] = {}

    def bind(self, options: ort.SessionOptions, model: Path) -> int:
        """Give ``options`` the shared view of every initializer ``model`` keeps in this file and turn prepacking
        off; the number of initializers bound."""
        bound = 0
        for value in load_onnx(model, RuntimeBackendError).graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor) or Path(tensor.path).resolve() != self.path:
                continue
            key = (tensor.offset, tensor.length, tensor.dtype, tuple(tensor.shape.numpy()))
            if key not in self._values:
                data = self._map[tensor.offset : tensor.offset + tensor.length].view(tensor.dtype.numpy())
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(data.reshape(key[3]))
            options.add_initializer(value.name, self._values[key])
            bound += 1
        options.add_session_config_entry("session.disable_prepacking", "1")
        return bound


class OrtRunner:
    """Run one ONNX file with ONNX Runtime."""

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
        optimization: str = "all",
        require: bool = False,
        spin: bool = True,
        weights: SharedWeights | None = None,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise RuntimeBackendError(f"model file {self.path} does not exist")
        self.requested = list(providers or ["CPUExecutionProvider"])
        available = ort.get_available_providers()
        missing = [p for p in self.requested if p not in available]
        if missing and require:
            raise RuntimeBackendError(
                f"ONNX Runtime provider(s) {missing} are not available (available: {available}); "
                "install onnxruntime-gpu with matching CUDA/TensorRT libraries"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spin:  # idle pool threads must not busy-wait while another session runs (benchmarks alternate)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.weights = weights  # the session reads the map's pages: it must outlive the session
        if weights is not None:
            weights.bind(options, self.path)
        providers_to_use = [p for p in self.requested if p in available] or ["CPUExecutionProvider"]
        try:
            if extra_outputs:
                options.add_session_config_entry(_EXTERNAL_FOLDER, str(self.path.parent.resolve()))
                source: bytes | str = _with_outputs(self.path, extra_outputs)
            else:
                source = str(self.path)
            self.session = ort.InferenceSession(source, options, providers=providers_to_use)
        except (
            ort.capi.onnxruntime_pybind11_state.Fail,
            ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
            RuntimeError,
        ) as e:
            raise RuntimeBackendError(f"ONNX Runtime cannot load {self.path.name}: {first_line(e)}") from e
        self.active = self.session.get_providers()
        if require and any(p not in self.active for p in self.requested):
            raise RuntimeBackendError(
                f"requested providers {self.requested} but the session runs on {self.active} (silent fallback)"
            )

    @property
    def fell_back(self) -> bool:
        """True when a requested accelerator provider is not among the ones that really run."""
        return any(p not in self.active for p in self.requested)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run_binding(self, binding: ort.IOBinding) -> None:
        """Run with inputs and outputs bound to buffers (``session.io_binding()``), e.g. a KV cache updated in place."""
        try:
            self.session.run_with_iobinding(binding)
        except (ort.capi.onnxruntime_pybind11_state.Fail, RuntimeError) as e:
            raise RuntimeBackendError(f"ONNX Runtime failed on {self.path.name}: {first_line(e)}") from e

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        try:
            values = self.session.run(names, dict(feeds))
        except (
            ort.capi.onnxruntime_pybind11_state.Fail,
            ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            RuntimeError,
        ) as e:
            raise RuntimeBackendError(f"ONNX Runtime failed on {self.path.name}: {first_line(e)}") from e
        return dict(zip(names, values, strict=True))
