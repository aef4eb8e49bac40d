"""Export the Qwen2-VL / Qwen2.5-VL vision tower for still images: one static graph per bucket grid (TensorRT) and,
optionally, one graph with a symbolic patch count (ONNX Runtime), verified before the directory is written.

The directory holds ``vision_<rows>x<columns>.onnx`` per bucket, ``vision_dynamic.onnx``, their shared
``weights.data`` and ``vision.json`` (source, seed, host facts, buckets, lint per graph, parity per check). Every
bucket graph must pass the TensorRT lint (the dynamic graph's result, with its symbolic axis as an optimization
profile axis, is recorded); every graph is run on ONNX Runtime against the eager tower
(``model.model.visual`` with the grid's ``grid_thw``) on random pixels: each bucket on its own graph, the dynamic
graph on every bucket's grid and on one grid that is no bucket. A failure leaves nothing behind.

This is the vision half of a Qwen-VL MLLM artifact; the decoder graphs (three-row mRoPE positions) are not
exported yet, so ``tokensieve export`` still refuses the family.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokensieve.artifact.store import replaced_directory, save_shared, versions
from tokensieve.converters.qwen_family import check_buckets
from tokensieve.converters.qwen_vision import build_qwen_vl, example_pixels, export_bucket, export_dynamic
from tokensieve.converters.qwen_vl import QWEN_VL_PRESETS, is_qwen_vl_source
from tokensieve.errors import ArtifactError, ExportError, ParityError, SourceError
from tokensieve.graph_passes.lint import lint
from tokensieve.runtimes.qwen_vision import DESCRIPTION, DYNAMIC, QwenVision, bucket_name

TOLERANCE = 1e-4  # max |graph - eager| over max |eager|


def _off_bucket(grids: list[tuple[int, int]], merge: int) -> tuple[int, int]:
    """A grid that is no bucket, for the dynamic graph's check."""
    rows, columns = grids[0]
    return next(
        (rows + k * merge, columns) for k in range(1, len(grids) + 2) if (rows + k * merge, columns) not in grids
    )


def _target(out: str | os.PathLike) -> Path:
    """``out`` as an absolute path, refused if it holds something other than an earlier vision export."""
    path = Path(out).absolute()
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / DESCRIPTION).is_file())):
        raise ArtifactError(f"{path} exists and is not a vision export; choose another out or remove it")
    return path


def _parity(directory, tower, checks: list[tuple[str, tuple[int, int]]]) -> list[dict]:
    """Each ``(graph name, grid)`` on ONNX Runtime against the eager tower, on random pixels."""
    vision = QwenVision.from_export(directory, threads=1)
    rows = []
    for seed, (graph, grid) in enumerate(checks):
        pixels = example_pixels(grid, vision.host, seed=seed + 1)
        with torch.no_grad():
            grid_thw = torch.tensor([[1, *grid]])
            eager = tower(torch.from_numpy(pixels), grid_thw=grid_thw).pooler_output.numpy()
        out = vision.run(graph, pixels, grid)
        diff, scale = float(np.abs(out - eager).max()), float(np.abs(eager).max())
        rows.append({"graph": graph, "grid": list(grid), "max_abs_diff": diff, "scale": scale})
        if out.shape != eager.shape or not diff <= TOLERANCE * scale:
            raise ParityError(f"{graph} on a {grid[0]}x{grid[1]} grid differs from the eager tower by {diff:.3g}")
    return rows


def export_qwen_vision(
    source: str,
    buckets: Sequence[Sequence[int]],
    out: str | os.PathLike,
    *,
    dynamic: bool = True,
    seed: int = 0,
    opset: int = 18,
) -> dict[str, Any]:
    """Write the vision graphs of ``source`` (``hf:qwen2.5-vl-tiny``, a local checkpoint) for ``buckets`` =
    ``[(rows, columns), ...]`` patches into ``out``; return what ``vision.json`` records."""
    name = source.removeprefix("hf:")
    if not is_qwen_vl_source(name):
        raise SourceError(f"{source} is not a Qwen2-VL / Qwen2.5-VL preset or checkpoint")
    target = _target(out)
    model, host = build_qwen_vl(name, seed)
    grids = check_buckets(buckets, host)
    tower = model.model.visual
    graphs = {bucket_name(grid): export_bucket(tower, host, grid, opset) for grid in grids}
    reports = {key: lint(graph) for key, graph in graphs.items()}
    failed = [f"{key}: {report.errors[0]}" for key, report in reports.items() if not report.ok]
    if failed:
        raise ExportError(f"bucket graphs fail the TensorRT lint: {'; '.join(failed)}")
    checks = [(key, grid) for key, grid in zip(graphs, grids, strict=True)]
    if dynamic:
        graphs[DYNAMIC] = export_dynamic(tower, host, grids[0], opset)
        reports[DYNAMIC] = lint(graphs[DYNAMIC], profiles=True)  # recorded: its axis is a profile axis for TensorRT
        checks += [(DYNAMIC, grid) for grid in [*grids, _off_bucket(grids, host["merge_size"])]]
    description = {
        "source": source,
        "seed": seed if name in QWEN_VL_PRESETS else None,  # checkpoints carry their weights
        "host": host,
        "buckets": [list(grid) for grid in grids],
        "dynamic": f"{DYNAMIC}.onnx" if dynamic else None,
        "lint": {f"{key}.onnx": report.ok for key, report in reports.items()},
        "versions": versions(),
    }
    with replaced_directory(target, "; choose a writable out") as directory:
        save_shared(graphs, directory, {key: f"{key}.onnx" for key in graphs})
        (directory / DESCRIPTION).write_text(json.dumps(description, indent=1))
        description["parity"] = _parity(directory, tower, checks)
        (directory / DESCRIPTION).write_text(json.dumps(description, indent=1))
    return description
