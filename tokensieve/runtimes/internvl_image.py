"""Host-side image handling of InternVL in numpy (and PIL for the bicubic resize), no torch.

What Hugging Face's InternVL processor does with one image (its image processor ``GotOcr2ImageProcessor`` with
``crop_to_patches``, PIL backend): choose a grid of ``columns x rows`` tiles, between ``min_tiles`` and
``max_tiles`` of them, whose aspect ratio is closest to the image's (on a tie, the grid with more tiles as long as
the image covers more than half of its area); resize the whole image to that grid (bicubic) and cut it into square
tiles of ``image_size`` pixels, row by row; when there is more than one tile, append a thumbnail (the whole image
resized to one tile). Every tile is rescaled by 1/255 and normalised with the processor's mean and std. The vision
graph turns each tile into ``tile_tokens`` features; the image's features are the tiles' in order (thumbnail last),
one contiguous run in the prompt between ``<img>`` and ``</img>``.

``host`` is the preprocessing dictionary an InternVL artifact's manifest records (see ``converters/internvl.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tokensieve.runtimes.llava_image import normalise, resize


def grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every ``(columns, rows)`` with ``min_tiles <= columns * rows <= max_tiles``, by ascending tile count
    (columns-major order among equal counts, as the processor enumerates them)."""
    span = range(1, max_tiles + 1)
    found = [(c, r) for c in span for r in span if min_tiles <= c * r <= max_tiles]
    return sorted(found, key=lambda grid: grid[0] * grid[1])


def tile_grid(size: tuple[int, int], host: dict[str, Any]) -> tuple[int, int]:
    """``(columns, rows)`` of tiles for an image of ``size = (height, width)``."""
    height, width = size
    aspect, area, tile = width / height, width * height, host["image_size"]
    best, best_difference = (1, 1), float("inf")
    for columns, rows in grids(host["min_tiles"], host["max_tiles"]):
        difference = abs(aspect - columns / rows)
        if difference < best_difference:
            best, best_difference = (columns, rows), difference
        elif difference == best_difference and area > 0.5 * tile * tile * columns * rows:
            best = (columns, rows)
    return best


def tile_images(image: np.ndarray, host: dict[str, Any]) -> list[np.ndarray]:
    """The uint8 tiles of ``image [H, W, 3]``: the grid's tiles row by row, then the thumbnail (several tiles)."""
    side = host["image_size"]
    columns, rows = tile_grid(image.shape[:2], host)
    canvas = resize(image, rows * side, columns * side)
    tiles = [canvas[r * side : (r + 1) * side, c * side : (c + 1) * side] for r in range(rows) for c in range(columns)]
    return tiles if len(tiles) == 1 else [*tiles, resize(image, side, side)]


def patches(image: np.ndarray, host: dict[str, Any]) -> list[np.ndarray]:
    """The vision graph's input tiles, normalised ``[3, S, S]`` float32 each."""
    return [normalise(tile, host) for tile in tile_images(image, host)]


def pack(features: np.ndarray, size: tuple[int, int], host: dict[str, Any], newline: np.ndarray | None) -> np.ndarray:
    """Vision-graph output ``[P, n, D]`` -> the image's features ``[P * n, D]``: the tiles in order."""
    return features.reshape(-1, features.shape[-1])


def count(host: dict[str, Any], size: tuple[int, int] | None) -> tuple[int, int]:
    """``(image-token positions, tiles)`` of an image of ``size`` (default: one tile's square)."""
    columns, rows = tile_grid(size or (host["image_size"], host["image_size"]), host)
    tiles = columns * rows + (columns * rows > 1)
    return tiles * host["tile_tokens"], tiles
