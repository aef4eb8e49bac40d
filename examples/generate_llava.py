"""Python API walk-through for MLLMs: split-export LLaVA-NeXT, look at the decoder sites, generate, check parity.

Usage: python examples/generate_llava.py [OUT_DIR]   (default runs/llava_next_tiny; about 30 s on 2 CPU cores)
"""

import sys

import numpy as np

import tokensieve
from tokensieve.inspect.image import format_inspection

out = sys.argv[1] if len(sys.argv) > 1 else "runs/llava_next_tiny"
# A small random LLaVA-NeXT (no hub); pass "hf:/path/to/llava-v1.6-checkpoint" for a real local checkpoint.
artifact = tokensieve.export("hf:llava-next-tiny", out=out, capacity=1024)
print(format_inspection(artifact.inspect()))  # graphs, cache geometry, per-layer sites (stream, Q/K after RoPE, cache)

# A wide image: AnyRes picks the grid, crops it, packs the features with image_newline; all of it in numpy on the host.
image = np.random.default_rng(0).integers(0, 256, size=(120, 260, 3), dtype=np.uint8)
generation = artifact.generate(image, "What is in the picture?", max_new_tokens=16)
start, end = generation.image_span
print(f"{end - start} image tokens at [{start}, {end}) of a {len(generation.prompt_ids)}-token prompt")
print("new ids:", generation.ids, "stop:", generation.stop, "timings (ms):", generation.timings_ms)

# The same prompt through the growing-cache decode graph gives the same tokens.
assert artifact.generate(image, "What is in the picture?", max_new_tokens=16, cache="growing").ids == generation.ids

report = artifact.parity(count=2, new_tokens=16)  # HF eager generate vs the ONNX graphs, both cache forms
print(report.text())
sys.exit(0 if report.ok else 1)
