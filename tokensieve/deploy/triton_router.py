"""Triton Python-backend model written by ``tokensieve triton`` (as ``model.py``) for a staged artifact.

Every request's images run stage 1; tokensieve's dispatcher (:class:`tokensieve.runtimes.buckets.StagedRunner`)
routes each image to the smallest bucket that holds its token count, calling the stage models of this repository
through Business Logic Scripting, and reassembles the batch in order. ``routing.json`` beside this file names the
stage models and holds the artifact's ``stages`` manifest entry. Token-level outputs are zero-padded to the largest
last bucket; ``kept_tokens`` and ``buckets`` ([batch, sites]) say how many tokens each site kept and where each image
ran. A count above the largest bucket is an error response unless the artifact allows truncation. The requests
Triton hands over together (dynamic batching) are dispatched as one batch, in chunks of ``max_batch_size``, so each
bucket model sees the images of all of them at once; if that fails (for any reason), each request is answered on its
own so an error reaches only the request it belongs to.

Stage calls follow Triton's conventions: a tensor the stage's config reshapes (a ``[batch]`` tensor is ``dims: [1]``
with an empty ``reshape``) travels in its ``dims`` shape, so the router sends ``[B, 1]`` and turns the ``[B, 1]`` it
gets back into the ``[B]`` of the ONNX graph; outputs are requested in CPU memory (``preferred_memory``), since a
TensorRT stage may otherwise answer with GPU tensors, which ``as_numpy()`` cannot read; a stage whose engine takes a
fixed batch (``max_batch_size: 0``, a DLA engine) is fed in chunks of that batch.

The Python backend needs ``tokensieve`` importable: ``pip install --no-deps tokensieve`` plus numpy (the dispatcher
imports neither torch nor onnx).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tokensieve.errors import RuntimeBackendError, TokensieveError, first_line
from tokensieve.runtimes.buckets import StagedRunner
from tokensieve.runtimes.tensorrt import run_in_chunks


class TritonStage:
    """One stage model of the repository, called through Triton (``routing.json``'s entry for it)."""

    def __init__(
        self,
        model: str,
        inputs: Sequence[str],
        outputs: Sequence[str],
        reshape: Mapping[str, dict] | None = None,
        batch: int | None = None,
    ):
        self.model, self.input_names, self.outputs = model, list(inputs), list(outputs)
        self.reshape, self.batch = dict(reshape or {}), batch

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.batch is None:
            return self._call(feeds)
        return run_in_chunks(self._call, feeds, self.batch, self.batch)

    def _shaped(self, name: str, value: np.ndarray, key: str) -> np.ndarray:
        """``value`` in the shape Triton's reshape rule gives it: ``dims`` towards Triton, ``shape`` back."""
        rule = self.reshape.get(name)
        return value if rule is None else value.reshape(len(value), *rule[key])

    def _call(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=self.model,
            requested_output_names=self.outputs,
            inputs=[
                pb_utils.Tensor(name, np.ascontiguousarray(self._shaped(name, value, "dims")))
                for name, value in feeds.items()
            ],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeBackendError(f"stage model {self.model} failed: {response.error().message()}")
        out = {}
        for name in self.outputs:
            value = pb_utils.get_output_tensor_by_name(response, name).as_numpy()
            out[name] = self._shaped(name, value, "shape")
        return out


def _error(error: Exception) -> str:
    """An error response's message: a tokensieve error says what to do; anything else is named by its type."""
    if isinstance(error, TokensieveError):
        return str(error) or type(error).__name__
    return f"the router failed: {type(error).__name__}: {first_line(error)}"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        routing = json.loads((Path(args["model_repository"]) / args["model_version"] / "routing.json").read_text())
        models = routing["models"]
        self.input, self.slots = routing["input"], routing["slots"]
        self.specials = int(routing["stages"]["specials"])
        self.max_batch = int(json.loads(args["model_config"])["max_batch_size"])
        self.dispatcher = StagedRunner(
            "", routing["stages"], runner_factory=lambda relative, extra: TritonStage(**models[relative])
        )

    def _run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        step = self.max_batch or len(pixels)
        parts = [
            self.dispatcher.run(pixels[i : i + step]).packed(self.specials, self.slots)
            for i in range(0, len(pixels), step)
        ]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _respond(self, outputs: dict[str, np.ndarray]):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])

    def execute(self, requests: list) -> list:
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        if self.max_batch and len(arrays) > 1:
            try:
                merged = self._run(np.concatenate(arrays))
                ends = np.cumsum([len(a) for a in arrays])
                return [
                    self._respond({k: v[end - len(a) : end] for k, v in merged.items()})
                    for a, end in zip(arrays, ends, strict=True)
                ]
            except Exception:  # any failure: answer request by request, the error only where it belongs
                pass
        responses = []
        for pixels in arrays:
            try:
                responses.append(self._respond(self._run(pixels)))
            except Exception as e:  # a model must answer every request, with an error if need be
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(_error(e))))
        return responses
