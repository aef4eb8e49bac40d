"""Triton Python-backend model written by ``tokensieve triton`` (as ``model.py``) for a staged artifact.

Every request's images run stage 1; tokensieve's dispatcher (:class:`tokensieve.runtimes.buckets.StagedRunner`)
routes each image to the smallest bucket that holds its token count, calling the stage models of this repository
through Business Logic Scripting, and reassembles the batch in order. ``routing.json`` beside this file names the
stage models and holds the artifact's ``stages`` manifest entry. Token-level outputs are zero-padded to the largest
last bucket; ``kept_tokens`` and ``buckets`` ([batch, sites]) say how many tokens each site kept and where each image
ran. A count above the largest bucket is an error response unless the artifact allows truncation. The requests
Triton hands over together (dynamic batching) are dispatched as one batch, in chunks of ``max_batch_size``, so each
bucket model sees the images of all of them at once; if that fails, each request is answered on its own so an error
reaches only the request it belongs to.

The Python backend needs ``tokensieve`` importable: ``pip install --no-deps tokensieve`` plus numpy (the dispatcher
imports neither torch nor onnx).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tokensieve.errors import RuntimeBackendError, TokensieveError
from tokensieve.runtimes.buckets import StagedRunner


class TritonStage:
    """One stage model of the repository, called through Triton."""

    def __init__(self, model: str, inputs: Sequence[str], outputs: Sequence[str]):
        self.model, self.input_names, self.outputs = model, list(inputs), list(outputs)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=self.model,
            requested_output_names=self.outputs,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in feeds.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeBackendError(f"stage model {self.model} failed: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.outputs}


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
            except TokensieveError:
                pass  # answer request by request below, so only the failing request gets the error
        responses = []
        for pixels in arrays:
            try:
                responses.append(self._respond(self._run(pixels)))
            except TokensieveError as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses
