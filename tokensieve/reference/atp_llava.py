"""Eager ATP-LLaVA (training-free form) on a Hugging Face LLaVA model: the ground truth the exported graphs are
held to.

Written from the paper (Eq. 3-5) and docs/methods.md#atp-llava on the model's modules, independent of the graph passes:

1. prefill runs the decoder layers one by one (:mod:`tokensieve.reference.decoding`) under a registered attention
   function that runs Hugging Face's own eager attention of the model family and records, for the layers before
   each cut, the query and keys after RoPE and the probabilities it computed (on the tokens present at that
   point);
2. before each layer ``k`` of ``layers``: ``S_self`` = the ``[I, I]`` logits ``q . k * scaling`` among the image
   tokens present (keys repeated over each KV group), mean over the keys, mean over heads; ``S_cross`` = the
   probabilities of the rows after the image on the image columns, mean over those rows (0 if none), mean over
   heads; ``S_r = (S_self + S_cross) / 2``; keep ``S_r > threshold`` (absolute, or ``mean + offset * std`` of
   ``S_r`` in float64) or the spatial grid, and every text position; the stream and position ids are gathered;
3. greedy decoding at absolute positions, every layer attending to all of its cached positions.
"""

from __future__ import annotations

from typing import Any

import torch

from tokensieve.methods.atp_llava import ATPLLaVA
from tokensieve.reference.decoding import CutResult, cut_generate, reference_face


def atp_scores(record: dict[str, Any], image: torch.Tensor):
    """``(S_self, S_cross)`` of the image tokens at sequence indices ``image`` from one layer's recorded query
    ``[1, H, T, d]``, keys ``[1, H_kv, T, d]`` and probabilities ``[1, H, T, T]``."""
    query, key, probs = record["query"], record["key"], record["probs"]
    keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    logits = query[0][:, image] @ keys[0][:, image].transpose(-1, -2) * record["scaling"]  # [H, I, I]
    self_score = logits.mean(-1).mean(0)
    after = int(image.max()) + 1 if len(image) else 0
    rows = probs[0, :, after:][:, :, image]  # [H, R, I]
    cross = rows.mean(1).mean(0) if rows.shape[1] else torch.zeros(len(image), dtype=probs.dtype)
    return self_score, cross


def atp_keep(self_score, cross_score, present: torch.Tensor, image_tokens: int, method: ATPLLaVA) -> torch.Tensor:
    """Boolean mask over the image tokens ``present`` (indices into the image)."""
    redundancy = (self_score + cross_score) / 2
    if method.threshold is not None:
        threshold = method.threshold
    else:
        wide = redundancy.double()
        threshold = float(wide.mean() + method.offset * wide.std(unbiased=False)) if len(wide) else 0.0
    grid = torch.zeros(image_tokens, dtype=torch.bool)
    grid[method.grid_positions(image_tokens)] = True
    return (redundancy > threshold) | grid[present]


@reference_face(ATPLLaVA)
def atp_llava_generate(model, inputs: dict, method: ATPLLaVA, new_tokens: int) -> CutResult:
    """ATP-LLaVA greedy generation for processor ``inputs`` (batch 1) on a LLaVA ``model``."""

    def decide(record, positions: torch.Tensor, present: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        scores = atp_scores(record, torch.searchsorted(positions, present))
        keep = atp_keep(*scores, present - (image[0] if len(image) else 0), len(image), method)
        return torch.sort(torch.cat([positions[~torch.isin(positions, image)], present[keep]])).values

    return cut_generate(model, inputs, method.cuts, decide, new_tokens)
