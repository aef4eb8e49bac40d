"""Eager MustDrop on a Hugging Face LLaVA model: the ground truth the exported graphs are held to.

Written from docs/methods.md#mustdrop and the official code as read (liuting20/MustDrop, not copied) on the model's own
modules, independently of the graphs and the host code:

1. vision: CLIP's embeddings and layer 0; each ``3 x 3`` window's mean pairwise cosine (a loop over the windows);
   the windows at or above ``merge_threshold`` (descending, stable) become the mean of their 9 tokens, in front of
   the others (ascending); the remaining CLIP layers run on ``[CLS, merged, rest]``; the features are the selected
   layer's (CLS dropped, projected); the key set is the top ``ceil(key_ratio * n')`` of the last layer's eager
   attention probabilities (CLS row, patch columns, head mean; stable);
2. the prompt's image run is shortened to the ``n'`` features; prefill runs layer by layer
   (:func:`tokensieve.reference.decoding.cut_prefill`, Hugging Face's own eager attention recorded in each filter
   layer): after filter layer ``L``, with that layer's probabilities of the rows after the image on the image
   columns, head mean, ``g`` = column sums and ``m`` = column maxima: drop ``g < global_threshold * sum(g)`` and
   ``m < individual_threshold`` unless in the key set; later layers see position ids ``0..T'-1``;
3. the cache of every layer from the first filter layer on keeps the final positions only; greedy decoding feeds
   those layers at ``position - dropped`` and the earlier ones at the absolute position.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from tokensieve.methods.mustdrop import MustDrop
from tokensieve.reference.decoding import cut_prefill as run_cut_prefill
from tokensieve.reference.decoding import eager_attention, greedy, reference_face


@dataclass
class MustDropResult:
    merged_windows: torch.Tensor  # window indices, by descending similarity
    key_set: torch.Tensor  # image-token indices, ascending
    prompt_ids: torch.Tensor  # the prompt with the image run shortened to the merged features
    cut_positions: list[torch.Tensor]  # the prompt positions kept after each filter layer
    prefill_logits: torch.Tensor
    ids: list[int]


def window_similarity(tokens: torch.Tensor, windows: list[list[int]]) -> torch.Tensor:
    """``[W]``: per window, the mean cosine over the ordered pairs of distinct tokens of ``tokens [n, C]``."""
    values = []
    for window in windows:
        block = tokens[window]
        unit = block / block.norm(dim=-1, keepdim=True)
        cosine = unit @ unit.T
        values.append((cosine.sum() - cosine.diagonal().sum()) / (len(window) * (len(window) - 1)))
    return torch.stack(values)


@torch.no_grad()
def mustdrop_vision(model, pixel_values: torch.Tensor, method: MustDrop):
    """``(features [n', D], merged windows, key set)`` of one image ``pixel_values [1, 3, H, W]``."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    hidden = layers[0](tower.pre_layrnorm(tower.embeddings(pixel_values)), None)
    merged = torch.zeros(0, dtype=torch.long)
    if method.merge_threshold is not None:
        windows = method.windows(hidden.shape[1] - 1)
        similarity = window_similarity(hidden[0, 1:], windows)
        order = torch.sort(similarity, descending=True, stable=True).indices
        merged = order[: int((similarity >= method.merge_threshold).sum())]
        chosen = [windows[w] for w in merged.tolist()]
        absorbed = {token for window in chosen for token in window}
        rest = [t for t in range(hidden.shape[1] - 1) if t not in absorbed]
        means = [hidden[0, 1:][window].mean(0) for window in chosen]
        hidden = torch.stack([hidden[0, 0], *means, *hidden[0, 1:][rest]])[None]
    states = [None, hidden]  # as Hugging Face's hidden_states: [embeddings, layer 0, layer 1, ...]
    with eager_attention(model):
        for layer in layers[1:-1]:
            states.append(layer(states[-1], None))
        last = layers[-1]
        _, probs = last.self_attn(hidden_states=last.layer_norm1(states[-1]))
        states.append(last(states[-1], None))
    features = model.model.multi_modal_projector(states[model.config.vision_feature_layer][:, 1:])[0]
    cls = probs[0, :, 0, 1:].mean(0)
    key_set = torch.sort(torch.sort(cls, descending=True, stable=True).indices[: method.key_count(len(cls))]).values
    return features, merged, key_set


def filter_keep(probs: torch.Tensor, image: torch.Tensor, protected: torch.Tensor, method: MustDrop) -> torch.Tensor:
    """Boolean mask over the image tokens at sequence indices ``image`` from one layer's probabilities
    ``[1, H, T, T]``; ``protected`` marks the key-set tokens among them."""
    after = int(image.max()) + 1 if len(image) else 0
    rows = probs[0, :, after:][:, :, image].mean(0)  # [R, I]
    total = rows.sum(0)
    peak = rows.max(0).values if rows.shape[0] else torch.zeros(len(image), dtype=probs.dtype)
    candidate = (total < method.global_threshold * total.sum()) & (peak < method.individual_threshold)
    return ~candidate | protected


@reference_face(MustDrop)
@torch.no_grad()
def mustdrop_generate(model, inputs: dict, method: MustDrop, new_tokens: int) -> MustDropResult:
    """MustDrop greedy generation for LLaVA processor ``inputs`` (batch 1, one image)."""
    from transformers import DynamicCache

    features, merged, key_set = mustdrop_vision(model, inputs["pixel_values"], method)
    ids = inputs["input_ids"][0]
    where = torch.nonzero(ids == model.config.image_token_id)[:, 0]
    start, end = int(where[0]), int(where[-1]) + 1
    ids = torch.cat([ids[:start], torch.full((len(features),), model.config.image_token_id), ids[end:]])
    embeds = model.model.language_model.embed_tokens(ids[None]).clone()
    embeds[0, start : start + len(features)] = features
    image = torch.arange(start, start + len(features))

    def decide(record, positions: torch.Tensor, present: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        protected = torch.isin(present - start, key_set)
        keep = filter_keep(record["probs"], torch.searchsorted(positions, present), protected, method)
        return torch.sort(torch.cat([positions[~torch.isin(positions, image)], present[keep]])).values

    cache = DynamicCache()
    logits, kept = run_cut_prefill(model, embeds, image, method.cuts, decide, cache, contiguous=True)
    first = method.cache_cuts[0]
    layer_positions = [torch.arange(len(ids)), *kept]  # the positions each segment ran on
    bounds = [0, *method.cuts, len(cache.layers)]
    for segment, (low, high) in enumerate(itertools.pairwise(bounds)):
        take = torch.searchsorted(layer_positions[segment], kept[-1])
        for layer in cache.layers[max(low, first) : high]:
            layer.keys, layer.values = layer.keys[:, :, take], layer.values[:, :, take]
    dropped = len(ids) - len(kept[-1])
    new = greedy(model, logits, cache, len(ids), new_tokens, shift=((first, dropped),))
    return MustDropResult(merged, key_set, ids, kept, logits, new)
