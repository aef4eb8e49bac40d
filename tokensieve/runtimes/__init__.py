"""Running exported artifacts (ONNX Runtime, TensorRT) and the methods' decisions on the host, in numpy."""

from __future__ import annotations

from tokensieve.methods.faces import Faces

FACES = Faces(__name__)  # the methods' host faces ("prefill_cut", "image_tokens", "decoder", "bench_decoder")
