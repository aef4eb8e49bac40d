"""The benchmark for each artifact kind (``Artifact.kind``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokensieve.bench.image import bench_artifact, bench_staged
from tokensieve.bench.mllm import bench_llava

BENCH: dict[str, Callable[..., Any]] = {"image": bench_artifact, "staged": bench_staged, "mllm": bench_llava}
