"""The index tables of the Qwen2-VL / Qwen2.5-VL vision tower for one still image, in numpy, as the tower computes
them from its ``grid_thw``; and the runner of an exported vision directory.

For a grid of ``rows x columns`` patches (``merge x merge`` patches make one merged token):

- ``positions [rows * columns, 2]``: each patch's ``(row, column)``, patches in the processor's order (merge
  blocks row-major, patches row-major inside a block): the vision rotary embedding's angles.
- ``window_index [M]``: the merged tokens in window order. Qwen2.5-VL cuts the merged grid into squares of
  ``window_size / patch_size / merge`` tokens (the last row and column of windows hold what remains), windows
  row-major, tokens row-major inside a window; its windowed blocks attend only within a window, its other blocks
  over the whole image, and the tower returns the merged features in the processor's order again.
- ``window_ids [M]``: the window of each merged token in window order (equal ids attend to each other).
- ``reverse [M]``: the inverse permutation of ``window_index``.

A tower without windows (Qwen2-VL) needs only ``positions``. ``host`` gives ``patch_size``, ``merge_size`` and
``window_size`` (0: no windows).

A vision export (``exporter/qwen_vision.py``) or a Qwen-VL MLLM artifact holds one static graph per bucket
(``rows x columns``, tables folded in) and a graph with a symbolic patch count that takes the tables as inputs;
``QwenVision`` runs the one that fits a preprocessed image.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.errors import ArtifactError, InputError
from tokensieve.runtimes.llava_image import load_image
from tokensieve.runtimes.ort import OrtRunner, SharedWeights
from tokensieve.runtimes.qwen_image import image_tokens, patch_grid, preprocess

DESCRIPTION = "vision.json"
WEIGHTS = "weights.data"
DYNAMIC = "vision_dynamic"  # the graph with a symbolic patch count


def positions(grid: tuple[int, int], merge: int) -> np.ndarray:
    """``[rows * columns, 2]`` int64 ``(row, column)`` of each patch, in the processor's patch order."""
    rows, columns = grid
    h, w = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    blocks = [
        a.reshape(rows // merge, merge, columns // merge, merge).transpose(0, 2, 1, 3).reshape(-1) for a in (h, w)
    ]
    return np.stack(blocks, axis=1).astype(np.int64)


def windows(grid: tuple[int, int], host: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(window_index [M], window_ids [M])`` int64 of a grid of patches (see the module docstring)."""
    merge = host["merge_size"]
    rows, columns = grid[0] // merge, grid[1] // merge
    side = host["window_size"] // merge // host["patch_size"]
    down, across = math.ceil(rows / side), math.ceil(columns / side)
    padded = np.full((down * side, across * side), -1, np.int64)
    padded[:rows, :columns] = np.arange(rows * columns).reshape(rows, columns)
    blocks = padded.reshape(down, side, across, side).transpose(0, 2, 1, 3).reshape(down * across, side * side)
    kept = blocks >= 0
    return blocks[kept], np.repeat(np.arange(down * across), kept.sum(axis=1))


def grid_tables(grid: tuple[int, int], host: dict[str, Any]) -> dict[str, np.ndarray]:
    """The tables a grid's graph takes, by input name (the dynamic graph's inputs besides ``pixel_values``)."""
    if any(side % host["merge_size"] for side in grid):
        raise InputError(f"a grid of {grid[0]}x{grid[1]} patches is not a multiple of merge_size {host['merge_size']}")
    tables = {"positions": positions(grid, host["merge_size"])}
    if host["window_size"]:
        index, ids = windows(grid, host)
        tables |= {"window_index": index, "window_ids": ids, "reverse": np.argsort(index)}
    return tables


def profile_axes(host: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """TensorRT profile ranges ``(min, opt, max)`` of the dynamic graph's axes: ``tokens`` (merged tokens of an
    image the processor keeps within ``min_pixels .. max_pixels``; opt: an image of the typical side) and
    ``<merge²>*tokens`` (its patches)."""
    unit = (host["patch_size"] * host["merge_size"]) ** 2
    low, high = max(1, host["min_pixels"] // unit), max(1, host["max_pixels"] // unit)
    tokens = (low, min(max(low, image_tokens((host["image_size"],) * 2, host)), high), high)
    merge = host["merge_size"] ** 2
    return {"tokens": tokens, f"{merge}*tokens": tuple(merge * t for t in tokens)}


def bucket_name(grid: tuple[int, int]) -> str:
    """A bucket graph's name (an MLLM artifact's graph key; ``.onnx`` added: its file)."""
    return f"vision_{grid[0]}x{grid[1]}"


def bucket_file(grid: tuple[int, int]) -> str:
    return bucket_name(grid) + ".onnx"


def _segments(length: int, window: int) -> list[int]:
    """The window lengths along one axis of ``length`` merged tokens (the last window is what remains)."""
    return [window] * (length // window) + ([length % window] if length % window else [])


def tower_macs(vision: dict[str, int], rows: int, columns: int) -> int:
    """Multiply-accumulates of one still image of ``rows x columns`` patches through the vision tower: patch
    embedding, the blocks (projections, MLP, ``Q·Kᵀ`` and ``P·V`` over the whole image in the full-attention blocks
    and within each window in the others), the merger MLP."""
    hidden, merge, patches = vision["hidden"], vision["merge_size"], rows * columns
    pixels = vision["channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    dense = patches * (4 * hidden * hidden + (2 + vision["gated"]) * hidden * vision["intermediate"])
    full = 2 * patches * patches * hidden
    windowed = full
    if vision["window"]:
        unit = vision["window"] // merge // vision["patch_size"]
        square = [sum(s * s for s in _segments(n // merge, unit)) for n in (rows, columns)]
        windowed = 2 * square[0] * square[1] * merge**4 * hidden
    attention = vision["full_layers"] * full + (vision["layers"] - vision["full_layers"]) * windowed
    width = hidden * merge * merge
    merger = patches // merge**2 * (width * width + width * vision["projector"])
    return patches * hidden * pixels + vision["layers"] * dense + attention + merger


class QwenVision:
    """The vision graphs of a Qwen-VL tower in ``directory``: ``graphs`` maps each bucket's name
    (:func:`bucket_name`) and, when there is one, :data:`DYNAMIC` (the symbolic-grid graph) to its file; ``options``
    go to every :class:`OrtRunner` (one ``SharedWeights`` for all of them). ``features(pixel_values, grid)`` runs the
    bucket graph of ``grid`` when there is one, else the dynamic graph; ``encode(image)`` preprocesses an image as
    the processor does, resized to the nearest bucket when its own grid has no graph."""

    def __init__(self, directory: str | os.PathLike, graphs: dict[str, str], host: dict[str, Any], **options: Any):
        self.directory, self.graphs, self.host, self._options = Path(directory), dict(graphs), host, options
        self.buckets = [grid for grid in map(_grid, graphs) if grid is not None]
        self.dynamic = DYNAMIC in graphs
        self._runners: dict[str, OrtRunner] = {}

    @classmethod
    def from_export(cls, directory: str | os.PathLike, threads: int | None = None) -> QwenVision:
        """The graphs of a vision export (``exporter/qwen_vision.py``: ``vision.json`` beside them)."""
        directory = Path(directory)
        try:
            description = json.loads((directory / DESCRIPTION).read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{directory} holds no readable {DESCRIPTION} ({e}); re-export it") from None
        graphs = {bucket_name(tuple(grid)): bucket_file(tuple(grid)) for grid in description["buckets"]}
        if description.get("dynamic"):
            graphs[DYNAMIC] = description["dynamic"]
        weights = SharedWeights(directory / WEIGHTS)
        return cls(directory, graphs, description["host"], threads=threads, weights=weights)

    def run(self, key: str, pixel_values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """``image_features [M, D]`` of graph ``key`` (a bucket's name or :data:`DYNAMIC`) on one preprocessed
        still image of ``grid = (rows, columns)`` patches."""
        if not isinstance(pixel_values, np.ndarray) or pixel_values.dtype != np.float32 or pixel_values.ndim != 2:
            raise InputError("pixel_values must be a float32 array [patches, C*T*P*P] (runtimes.qwen_image.preprocess)")
        if pixel_values.shape[0] != grid[0] * grid[1]:
            raise InputError(f"{pixel_values.shape[0]} patches do not fill a grid of {grid[0]}x{grid[1]}")
        if key not in self._runners:
            self._runners[key] = OrtRunner(self.directory / self.graphs[key], **self._options)
        feeds = {"pixel_values": pixel_values}
        if key == DYNAMIC:
            feeds |= grid_tables(grid, self.host)
        return self._runners[key].run(feeds)["image_features"]

    def features(self, pixel_values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """``image_features [M, D]`` of one preprocessed still image: the bucket graph of ``grid`` when there is
        one, else the dynamic graph."""
        grid = (int(grid[0]), int(grid[1]))
        if grid in self.buckets:
            return self.run(bucket_name(grid), pixel_values, grid)
        if not self.dynamic:
            raise InputError(f"no bucket of {grid[0]}x{grid[1]} patches and no dynamic graph; resize to a bucket")
        return self.run(DYNAMIC, pixel_values, grid)

    def encode(self, image: Any) -> tuple[np.ndarray, tuple[int, int, int]]:
        """``(features [M, D], grid (1, rows, columns))`` of one still image: resized as the processor resizes it,
        or, when that grid has no bucket graph and there is no dynamic graph, to the nearest bucket."""
        array = load_image(image)
        grid = patch_grid(array.shape[:2], self.host)[1:]
        bucket = grid if grid in self.buckets or self.dynamic else self.nearest_bucket(grid)
        pixel_values, grid_thw = preprocess(array, self.host, bucket)
        return self.features(pixel_values, bucket), grid_thw

    def nearest_bucket(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The bucket closest to ``grid`` in aspect ratio, then in patch count."""
        if not self.buckets:
            raise InputError("this vision export has no buckets")
        aspect = math.log(grid[0] / grid[1])
        return min(
            self.buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), abs(b[0] * b[1] - grid[0] * grid[1]))
        )


def _grid(key: str) -> tuple[int, int] | None:
    """The grid of a bucket graph's name (``None``: not a bucket's)."""
    rows, _, columns = key.removeprefix("vision_").partition("x")
    return (int(rows), int(columns)) if key.startswith("vision_") and rows.isdigit() and columns.isdigit() else None
