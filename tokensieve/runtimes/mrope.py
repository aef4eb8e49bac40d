"""Multimodal rotary position ids (mRoPE) of Qwen2-VL / Qwen2.5-VL in numpy: three rows ``(t, h, w)`` per prompt
position, as the model's ``get_rope_index`` builds them.

A run of text continues one counter on all three rows. A run of vision tokens (one image or video, the tokens of
its merged grid in row-major order) takes ``t = start + frame * interval``, ``h = start + row``,
``w = start + column`` where ``start`` is the counter before it; the counter then moves on by
``max(rows, columns)`` merged tokens, so the text after an image continues after the image's largest spatial
position. ``interval`` is 1 for still images and for Qwen2-VL; Qwen2.5-VL spaces a video's frames by
``tokens_per_second * seconds_per_grid`` (truncated, in float32 as the model computes it). The rope delta is
``max position + 1 - prompt length``: decoding step ``s`` (counted in the unreduced sequence: prompt length plus
tokens generated before it) has position ``s + delta`` on all three rows, whatever a method dropped or evicted.

``host`` gives ``merge_size``, ``image_token_id`` and, for videos, ``video_token_id`` and ``tokens_per_second``
(``None`` for Qwen2-VL).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Any

import numpy as np

from tokensieve.errors import InputError

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(ids: Sequence[int], host: dict[str, Any]) -> np.ndarray:
    """0 for text, 1 for image tokens, 2 for video tokens (the processor's ``mm_token_type_ids``)."""
    ids = np.asarray(ids)
    types = np.where(ids == host["image_token_id"], IMAGE, TEXT)
    if host.get("video_token_id") is not None:
        types = np.where(ids == host["video_token_id"], VIDEO, types)
    return types


def _vision_rows(start: int, grid: Sequence[int], merge: int, interval: np.float32 | int) -> np.ndarray:
    frames, rows, columns = grid[0], grid[1] // merge, grid[2] // merge
    t = (np.arange(frames, dtype=np.float32) * interval).astype(np.int64) + start
    h, w = np.arange(rows) + start, np.arange(columns) + start
    return np.stack([a.reshape(-1) for a in np.meshgrid(t, h, w, indexing="ij")])


def _interval(kind: int, host: dict[str, Any], seconds: float | None) -> np.float32 | int:
    if kind == IMAGE or host.get("tokens_per_second") is None:
        return 1
    return np.float32(host["tokens_per_second"]) * np.float32(1.0 if seconds is None else seconds)


def rope_index(
    ids: Sequence[int],
    host: dict[str, Any],
    image_grids: Sequence[Sequence[int]] = (),
    video_grids: Sequence[Sequence[int]] = (),
    seconds_per_grid: Sequence[float] | None = None,
) -> tuple[np.ndarray, int]:
    """``(position_ids [3, T] int64, rope delta)`` of a prompt of ``ids`` whose image (video) token runs belong, in
    order, to ``image_grids`` (``video_grids``) ``(t, rows, columns)`` of patches."""
    merge = host["merge_size"]
    grids = {IMAGE: iter(image_grids), VIDEO: iter(video_grids)}
    seconds = iter(seconds_per_grid or [None] * len(video_grids))
    pieces, position = [], 0
    for kind, run in groupby(token_types(ids, host).tolist()):
        length = len(list(run))
        if kind == TEXT:
            pieces.append(np.broadcast_to(np.arange(position, position + length), (3, length)))
            position += length
            continue
        grid = next(grids[kind], None)
        if grid is None or grid[0] * grid[1] * grid[2] // merge**2 != length:
            raise InputError(
                f"a run of {length} vision tokens does not match the next grid {grid}; expand the prompt with "
                "the grids of its images in order (runtimes.qwen_image.expand_prompt)"
            )
        interval = _interval(kind, host, next(seconds) if kind == VIDEO else None)
        pieces.append(_vision_rows(position, grid, merge, interval))
        position += max(grid[1], grid[2]) // merge
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    return positions.astype(np.int64), int(positions.max(initial=-1)) + 1 - len(ids)


def decode_positions(step: int, delta: int, count: int = 1) -> np.ndarray:
    """``[3, count]`` position ids of the tokens at sequence indices ``step .. step + count - 1`` after the prompt
    (``step`` = unreduced prompt length + tokens generated so far)."""
    return np.broadcast_to(np.arange(step, step + count) + delta, (3, count)).astype(np.int64)
