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

An exported vision directory (``exporter/qwen_vision.py``) holds one static graph per bucket (``rows x columns``,
tables folded in) and a graph with a symbolic patch count that takes the tables as inputs; ``QwenVision`` runs the
one that fits a preprocessed image.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.errors import ArtifactError, InputError
from tokensieve.runtimes.ort import OrtRunner, SharedWeights

DESCRIPTION = "vision.json"
WEIGHTS = "weights.data"


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


def bucket_file(grid: tuple[int, int]) -> str:
    return f"vision_{grid[0]}x{grid[1]}.onnx"


class QwenVision:
    """The graphs of an exported vision directory: ``features(pixel_values, grid)`` runs the bucket graph of
    ``grid`` when there is one, else the dynamic graph with the grid's tables."""

    def __init__(self, directory: str | os.PathLike, threads: int | None = None):
        self.directory = Path(directory)
        try:
            self.description = json.loads((self.directory / DESCRIPTION).read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{self.directory} holds no readable {DESCRIPTION} ({e}); re-export it") from None
        self.host = self.description["host"]
        self.buckets = [tuple(grid) for grid in self.description["buckets"]]
        self._weights = SharedWeights(self.directory / WEIGHTS)
        self._threads, self._runners = threads, {}

    def run(self, graph: str, pixel_values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """``image_features [M, D]`` of ``graph`` (a bucket's file or the dynamic graph's) on one preprocessed still
        image of ``grid = (rows, columns)`` patches."""
        if not isinstance(pixel_values, np.ndarray) or pixel_values.dtype != np.float32 or pixel_values.ndim != 2:
            raise InputError("pixel_values must be a float32 array [patches, C*T*P*P] (runtimes.qwen_image.preprocess)")
        if pixel_values.shape[0] != grid[0] * grid[1]:
            raise InputError(f"{pixel_values.shape[0]} patches do not fill a grid of {grid[0]}x{grid[1]}")
        if graph not in self._runners:
            self._runners[graph] = OrtRunner(self.directory / graph, threads=self._threads, weights=self._weights)
        feeds = {"pixel_values": pixel_values}
        if graph == self.description.get("dynamic"):
            feeds |= grid_tables(grid, self.host)
        return self._runners[graph].run(feeds)["image_features"]

    def features(self, pixel_values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """``image_features [M, D]`` of one preprocessed still image: the bucket graph of ``grid`` when there is
        one, else the dynamic graph."""
        grid = (int(grid[0]), int(grid[1]))
        if grid in self.buckets:
            return self.run(bucket_file(grid), pixel_values, grid)
        if not self.description.get("dynamic"):
            raise InputError(f"no bucket of {grid[0]}x{grid[1]} patches and no dynamic graph; resize to a bucket")
        return self.run(self.description["dynamic"], pixel_values, grid)

    def nearest_bucket(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The bucket closest to ``grid`` in aspect ratio, then in patch count."""
        if not self.buckets:
            raise InputError("this vision export has no buckets")
        aspect = math.log(grid[0] / grid[1])
        return min(
            self.buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), abs(b[0] * b[1] - grid[0] * grid[1]))
        )
