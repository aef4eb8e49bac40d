"""ONNX Runtime runner: the embedded default runtime.

Reports which execution provider really runs the graph: ``onnxruntime-gpu`` falls back to the CPU silently when
CUDA or TensorRT libraries are missing, so the runner compares the providers it asked for with the ones the session
registered, and raises when ``require`` is set and a requested provider is absent.

``extra_outputs`` exposes intermediate values (e.g. the kept-token indices a pruning site names
``tokensieve/site<k>/kept``) as additional outputs without writing a second model file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from tokensieve.errors import RuntimeBackendError, first_line
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
