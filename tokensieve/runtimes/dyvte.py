"""DyVTE's exit decision on the host (numpy): after a prefill segment, remove every image token if the last prompt
position's attention mass on them (:mod:`tokensieve.graph_passes.image_attention`) is below the threshold."""

from __future__ import annotations

import numpy as np

from tokensieve.methods.dyvte import DyVTE
from tokensieve.methods.faces import register


@register("prefill_cut", DyVTE)
def cut(
    out: dict[str, np.ndarray],
    positions: np.ndarray,
    image: np.ndarray,
    span: tuple[int, int],
    method: DyVTE,
    key_set: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One cut: the prompt ``positions`` present and the ``image`` positions among them -> the positions and image
    positions kept: the text only once the mass falls below ``threshold``, else everything. ``key_set``: unused
    (the ``"prefill_cut"`` face's signature)."""
    if len(image) and float(out["image_attention_mass"][0]) < method.threshold:
        return positions[~np.isin(positions, image)], image[:0]
    return positions, image
