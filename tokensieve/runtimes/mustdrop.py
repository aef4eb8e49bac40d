"""MustDrop's decisions on the host (numpy): the vision window merge, the key set and the prefill filter.

The graphs compute the scores (``vision_0``'s ``window_similarity``, ``vision_1``'s ``cls_attention``, the prefill
segments' ``image_global_attention`` / ``image_individual_attention``); the counts they lead to are data-dependent,
so the host applies the rules of :mod:`tokensieve.methods.mustdrop` between the graphs, each of which has a symbolic
token axis (one TensorRT optimization profile covers every count).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tokensieve.methods.faces import register
from tokensieve.methods.mustdrop import MustDrop
from tokensieve.runtimes.ort import OrtRunner


def top_descending(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest ``scores``, largest first, ties: lower index first (like ONNX TopK)."""
    return np.argsort(-scores, kind="stable")[:count]


def merge_windows(hidden: np.ndarray, similarity: np.ndarray, method: MustDrop) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1a on CLIP layer 0's output ``hidden [1, 1 + n, C]``: the windows whose ``similarity`` is at least
    ``merge_threshold`` each become the mean of their 9 tokens. Returns the merged sequence ``[1, 1 + n - 8 r, C]``
    (CLS, merged windows by descending similarity, the other tokens ascending) and the merged windows' indices."""
    merged = top_descending(similarity, int((similarity >= method.merge_threshold).sum()))
    windows = np.asarray(method.windows(hidden.shape[1] - 1))[merged]  # [r, 9] patch indices
    patches = hidden[0, 1:]
    means = patches[windows].mean(1) if len(merged) else patches[:0]
    rest = np.setdiff1d(np.arange(len(patches)), windows.ravel())
    return np.concatenate([hidden[0, :1], means, patches[rest]])[None], merged


def key_tokens(cls_attention: np.ndarray, method: MustDrop) -> np.ndarray:
    """Stage 1b: the image tokens (indices into the features) with the ``ceil(key_ratio * n)`` largest CLS
    attentions ``[1, n]``, ascending."""
    scores = cls_attention[0]
    return np.sort(top_descending(scores, method.key_count(len(scores))))


@register("image_tokens", MustDrop)
def image_tokens(
    vision: list[OrtRunner], pixel_values: np.ndarray, size: Any, host: Any, newline: Any, method: MustDrop
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The ``"image_tokens"`` face: :func:`vision_tokens` on ``vision_0`` and ``vision_1``."""
    return vision_tokens(*vision, pixel_values, method)


def vision_tokens(
    stem: OrtRunner, tail: OrtRunner, pixel_values: np.ndarray, method: MustDrop
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Stages 1a and 1b for one image: ``vision_0``, the window merge, ``vision_1``. Returns the features ``[n', D]``
    and ``{"merged_windows": ..., "key_set": ...}``."""
    out = stem.run({"pixel_values": pixel_values})
    hidden, merged = out["hidden_states"], np.arange(0)
    if "window_similarity" in out:
        hidden, merged = merge_windows(hidden, out["window_similarity"], method)
    out = tail.run({"hidden_states": hidden})
    return out["image_features"][0], {"merged_windows": merged, "key_set": key_tokens(out["cls_attention"], method)}


@register("prefill_cut", MustDrop)
def cut(
    out: dict[str, np.ndarray],
    positions: np.ndarray,
    image: np.ndarray,
    span: tuple[int, int],
    method: MustDrop,
    key_set: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2 after one filter layer: the prompt ``positions`` present and the ``image`` positions among them ->
    the positions and image positions kept: an image token goes iff its global attention is below
    ``global_threshold`` times their sum, its individual attention below ``individual_threshold``, and it is not in
    ``key_set`` (indices into the image)."""
    total, peak = out["image_global_attention"], out["image_individual_attention"]
    candidate = (total < method.global_threshold * total.sum()) & (peak < method.individual_threshold)
    keep = ~candidate | np.isin(image - span[0], key_set)
    return np.union1d(positions[~np.isin(positions, image)], image[keep]), image[keep]
