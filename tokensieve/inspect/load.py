"""``tokensieve inspect --load``: what each graph of an artifact costs to load on ONNX Runtime.

Each deployable graph gets a session the way the runtimes make one: with the artifact's ``weights.data`` memory-mapped
once and bound to every session (:class:`tokensieve.runtimes.ort.SharedWeights`; no per-session copy, no prepacking)
when the artifact has that file. Per graph: the session's creation seconds (graph optimisation included: what a
start-up pays for it) and the weights it binds (MiB; shared with every other graph that binds the same tensors, so
the per-graph figures add up to more than the file when graphs share layers). Sessions are made one after the
other and released, in the artifact's graph order.
"""

from __future__ import annotations

import time
from typing import Any

from tokensieve.manifest import WEIGHTS
from tokensieve.onnx_file import load_onnx
from tokensieve.runtimes.ort import OrtRunner, SharedWeights


def load_costs(artifact, threads: int | None = None) -> list[dict[str, Any]]:
    """One row per deployable graph: ``graph`` (its file), ``seconds`` (session creation), ``weights_mib`` (the
    initializers it binds from the shared weights file, or holds itself without one) and ``shared``."""
    file = artifact.path / WEIGHTS
    weights = SharedWeights(file) if file.is_file() else None
    rows = []
    for relative, _ in artifact.graph_files():
        path = artifact.path / relative
        start = time.perf_counter()
        runner = OrtRunner(path, threads=threads, weights=weights)
        seconds = time.perf_counter() - start
        del runner
        tensors = load_onnx(path).graph.initializers.values()
        size = sum(value.const_value.nbytes for value in tensors if value.const_value is not None)
        rows.append({"graph": relative, "seconds": seconds, "weights_mib": size / 2**20, "shared": weights is not None})
    return rows


def format_load_costs(rows: list[dict[str, Any]]) -> str:
    """The rows as a table, with the total."""
    lines = [f"{'graph':<28} {'load s':>7} {'weights MiB':>12}"]
    lines += [f"{r['graph']:<28} {r['seconds']:>7.3f} {r['weights_mib']:>12.1f}" for r in rows]
    shared = "memory-mapped once, shared by every session" if rows and rows[0]["shared"] else "per session"
    lines.append(f"{'total':<28} {sum(r['seconds'] for r in rows):>7.3f}   (weights {shared})")
    return "\n".join(lines)
