"""ATP-LLaVA's decision on the host (numpy): which prompt positions the decoder layers from ``k`` on keep.

The prefill head graph (:mod:`tokensieve.graph_passes.atp_scores`) returns the self- and cross-modality scores of
the image tokens; the rule (:mod:`tokensieve.methods.atp_llava`) is a threshold on their mean united with the
spatial grid, so the count is data-dependent and the prefill tail graph runs on the kept positions (a symbolic
sequence axis: one TensorRT optimization profile covers every count).
"""

from __future__ import annotations

import numpy as np

from tokensieve.methods.atp_llava import ATPLLaVA


def keep_image_tokens(self_score: np.ndarray, cross_score: np.ndarray, method: ATPLLaVA) -> np.ndarray:
    """Boolean mask over the image tokens: ``S_r > threshold`` or on the spatial grid. ``S_r`` is computed in the
    scores' dtype (float32, as the eager reference); the per-image threshold ``mean + offset * std`` in float64."""
    redundancy = (self_score + cross_score) / 2
    if method.threshold is not None:
        threshold = method.threshold
    else:
        wide = redundancy.astype(np.float64)
        threshold = float(wide.mean() + method.offset * wide.std()) if len(wide) else 0.0
    keep = redundancy > threshold
    keep[method.grid_positions(len(keep))] = True
    return keep


def kept_positions(
    self_score: np.ndarray, cross_score: np.ndarray, span: tuple[int, int] | None, length: int, method: ATPLLaVA
) -> np.ndarray:
    """Ascending prompt positions kept from layer ``k`` on: every text position and the kept image tokens."""
    keep = np.ones(length, bool)
    if span is not None:
        keep[span[0] : span[1]] = keep_image_tokens(self_score, cross_score, method)
    return np.flatnonzero(keep).astype(np.int64)
