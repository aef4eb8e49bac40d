"""Triton Python-backend model written by ``tokensieve triton`` (as ``model.py``) for an MLLM artifact.

Each request is one greedy generation with tokensieve's :class:`tokensieve.runtimes.llava.LlavaRunner` on the
artifact in ``artifact/`` beside this file (vision, embedding, prefill and decode graphs with the token reduction
inside; the KV cache and the method's host-side decisions live here, between the graphs), on ONNX Runtime with the
providers ``generate.json`` names. Inputs: ``prompt`` (one string; put into the chat template unless it holds
``<image>``), optional ``image`` (RGB ``uint8 [H, W, 3]``) and ``max_new_tokens`` (default in ``generate.json``).
Outputs: ``text`` and ``ids`` (the new tokens). Bad input (a prompt beyond the cache capacity, a placeholder count
that does not match the image) is an error response naming the problem.

The Python backend needs ``pip install --no-deps tokensieve`` and the packages in ``requirements.txt`` (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tokensieve import manifest as manifest_file
from tokensieve.errors import TokensieveError
from tokensieve.runtimes.llava import LlavaRunner


def _text(tensor) -> str:
    value = tensor.as_numpy().ravel()[0]
    return value.decode() if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        folder = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((folder / "generate.json").read_text())
        manifest = manifest_file.read(folder / "artifact")
        self.runner = LlavaRunner(
            folder / "artifact", manifest, cache=settings["cache"], providers=settings["providers"]
        )
        self.max_new_tokens = int(settings["max_new_tokens"])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                image = pb_utils.get_input_tensor_by_name(request, "image")
                limit = pb_utils.get_input_tensor_by_name(request, "max_new_tokens")
                out = self.runner.generate(
                    None if image is None else image.as_numpy(),
                    _text(pb_utils.get_input_tensor_by_name(request, "prompt")),
                    self.max_new_tokens if limit is None else int(limit.as_numpy().ravel()[0]),
                )
                tensors = [
                    pb_utils.Tensor("text", np.array([out.text.encode()], dtype=np.object_)),
                    pb_utils.Tensor("ids", np.asarray(out.ids, np.int64)),
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except TokensieveError as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses
