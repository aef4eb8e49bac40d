"""ATP-LLaVA's decisions on the host (numpy): which image tokens each cut keeps.

Each prefill segment but the last (:mod:`tokensieve.graph_passes.atp_scores`) returns the self- and cross-modality
scores of the image tokens still present; the rule (:mod:`tokensieve.methods.atp_llava`) is a threshold on their mean
united with the spatial grid, so the count is data-dependent and the next segment runs on the kept positions (a
symbolic sequence axis: one TensorRT optimization profile covers every count).
"""

from __future__ import annotations

import numpy as np

from tokensieve.methods.atp_llava import ATPLLaVA
from tokensieve.methods.faces import register


def keep_image_tokens(
    self_score: np.ndarray, cross_score: np.ndarray, present: np.ndarray, image_tokens: int, method: ATPLLaVA
) -> np.ndarray:
    """Boolean mask over the image tokens ``present`` (indices into the image's ``image_tokens``): ``S_r >
    threshold`` or on the spatial grid. ``S_r`` is computed in the scores' dtype (float32, as the eager reference);
    the per-image threshold ``mean + offset * std`` in float64."""
    redundancy = (self_score + cross_score) / 2
    if method.threshold is not None:
        threshold = method.threshold
    else:
        wide = redundancy.astype(np.float64)
        threshold = float(wide.mean() + method.offset * wide.std()) if len(wide) else 0.0
    return (redundancy > threshold) | np.isin(present, method.grid_positions(image_tokens))


@register("prefill_cut", ATPLLaVA)
def cut(
    out: dict[str, np.ndarray],
    positions: np.ndarray,
    image: np.ndarray,
    span: tuple[int, int],
    method: ATPLLaVA,
    key_set: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One cut from a segment's outputs ``out`` (the scores): the prompt ``positions`` present (ascending) and the
    ``image`` positions among them -> the positions and image positions kept (every text position stays).
    ``key_set``: unused (the ``"prefill_cut"`` face's signature)."""
    scores = out["image_self_score"], out["image_cross_score"]
    keep = keep_image_tokens(*scores, image - span[0], span[1] - span[0], method)
    kept_image = image[keep]
    return np.union1d(positions[~np.isin(positions, image)], kept_image), kept_image
