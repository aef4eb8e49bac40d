"""Eager GlobalCom² on a Hugging Face LLaVA-NeXT model: the ground truth the artifact's host selection is held to.

Written from the paper, docs/methods.md#globalcom2 and the official code's rules, in torch, leaning on Hugging Face for
the geometry (independently of :mod:`tokensieve.runtimes.globalcom2`):

1. the vision tower runs on the processor's crops; a pre-hook on the last encoder layer's attention captures its
   (normalised) input, from which the head-mean pre-softmax CLS logits are formed; features are the selected layer,
   CLS dropped, projected (as ``get_image_features``);
2. the thumbnail keeps its ``floor(retention * n)`` best tokens, in descending score order (stable sort);
3. crop budgets: thumbnail scores summed per crop cell (float64), softmax with the temperature, scaled and clipped;
4. the crop features, their scores and their token indices are laid out on the grid and unpadded with Hugging
   Face's own ``unpad_image``; the thumbnail scores are resized to the unpadded grid with ``F.interpolate``
   (bilinear, ``align_corners=False``); per crop ``F.normalize`` of both, summed, top ``int(N_i * scale_i)``;
5. the image becomes ``[thumbnail kept, grid rows of kept tokens + image_newline]`` (``layout="official"``: the
   official code's packing, built from per-crop slots as it does); the prompt's image run is
   shortened to that many placeholders, and prefill/greedy decoding run layer by layer
   (:mod:`tokensieve.reference.decoding`) at contiguous positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokensieve.methods.globalcom2 import GlobalCom2
from tokensieve.reference.decoding import greedy, prefill, reference_face


@dataclass
class GlobalCom2Result:
    kept_features: torch.Tensor  # indices into the vision tokens [P * n], in prompt order
    prompt_ids: torch.Tensor  # [T'] with one placeholder per kept feature (and newline)
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens


def vision_tokens(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [P, n, D], scores [P, n])`` of the crops ``pixel_values [P, 3, H, W]``."""
    tower = model.model.vision_tower
    attention = tower.encoder.layers[-1].self_attn
    captured: list[torch.Tensor] = []

    def capture(_module, _args, kwargs):
        captured.append(kwargs["hidden_states"])  # the layer's input after layer_norm1

    handle = attention.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        states = tower(pixel_values, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    x = captured[0]
    heads = attention.num_heads
    query = attention.q_proj(x[:, :1]).unflatten(-1, (heads, -1)).transpose(1, 2)  # [P, h, 1, d]
    key = attention.k_proj(x[:, 1:]).unflatten(-1, (heads, -1)).transpose(1, 2)  # [P, h, n, d]
    scores = (query @ key.transpose(-1, -2) * attention.scale).mean(1)[:, 0]
    features = model.model.multi_modal_projector(states[model.config.vision_feature_layer][:, 1:])
    return features, scores


def crop_scales(thumbnail: torch.Tensor, rows: int, columns: int, method: GlobalCom2) -> torch.Tensor:
    side = math.isqrt(thumbnail.numel())
    cells = torch.zeros(rows * columns, dtype=torch.float64)
    for token, score in enumerate(thumbnail.double()):
        i, j = divmod(token, side)
        cell = min(i // max(side // rows, 1), rows - 1) * columns + min(j // max(side // columns, 1), columns - 1)
        cells[cell] += score
    shifted = torch.exp((cells - cells.max()) / float(method.temperature))
    softmax = shifted / (shifted.sum() + 1e-8)
    return (float(method.retention) * (1 + softmax - softmax.mean())).clamp(max=1.0)


def select_tokens(
    features: torch.Tensor,
    scores: torch.Tensor,
    image_size: tuple[int, int],
    pinpoints: list,
    crop_side: int,
    newline: torch.Tensor,
    method: GlobalCom2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed features [N, D], kept indices into [P * n])`` from one image's ``features [P, n, D]`` and
    ``scores [P, n]`` (thumbnail first); ``image_size = (height, width)``, ``crop_side`` = the vision input side."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    count, tokens, dim = features.shape
    side = math.isqrt(tokens)
    thumbnail = torch.sort(scores[0], descending=True, stable=True).indices[: method.thumbnail_count(tokens)]
    rows, columns = get_anyres_image_grid_shape(image_size, pinpoints, crop_side)
    index = torch.arange(tokens, count * tokens, dtype=torch.float64).view(count - 1, tokens, 1)
    laid = [
        unpad_image(
            t.view(rows, columns, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3), image_size
        )
        for t in (features[1:], scores[1:, :, None], index)
    ]
    grid, crop_scores, index = laid[0], laid[1][0], laid[2][0].long()
    if crop_scores.numel():
        guide = F.interpolate(
            scores[0].view(1, 1, side, side), size=crop_scores.shape, mode="bilinear", align_corners=False
        )[0, 0]
    else:  # an image so thin that unpadding leaves no crop row (or column): only the thumbnail is kept
        guide = crop_scores.clone()
    crop = (index - tokens) // tokens
    keep = torch.zeros_like(crop_scores, dtype=torch.bool)
    slots = torch.full((count - 1, tokens), -1)  # official layout: the token written at each crop position
    for c, scale in enumerate(crop_scales(scores[0], rows, columns, method).tolist()):
        inside = crop == c
        budget = int(int(inside.sum()) * scale)
        combined = F.normalize(crop_scores[inside], dim=0) + F.normalize(guide[inside], dim=0)
        chosen = torch.zeros_like(combined, dtype=torch.bool)
        chosen[torch.sort(combined, descending=True, stable=True).indices[:budget]] = True
        keep[inside] = chosen
        slots[c, torch.nonzero(chosen)[:, 0]] = index[inside][chosen]
    thumbnail_features = features[0][thumbnail]
    if method.layout == "official":  # the padded grid's rows, each with a newline; slot j holds valid token j
        laid = slots.view(rows, columns, side, side).permute(0, 2, 1, 3).reshape(rows * side, columns * side)
        sequence = torch.cat([laid, torch.full((laid.shape[0], 1), -2)], dim=1).flatten()
        sequence = sequence[sequence != -1]
        crop_part = torch.where((sequence >= 0)[:, None], features.flatten(0, 1)[sequence.clamp(min=0)], newline)
        return torch.cat([thumbnail_features, crop_part]), torch.cat([thumbnail, sequence[sequence >= 0]])
    grid = torch.cat([grid, newline[:, None, None].expand(dim, grid.shape[1], 1)], dim=2)
    mask = torch.cat([keep, torch.ones(keep.shape[0], 1, dtype=torch.bool)], dim=1)
    return torch.cat([thumbnail_features, grid.permute(1, 2, 0)[mask]]), torch.cat([thumbnail, index[keep]])


@reference_face(GlobalCom2)
@torch.no_grad()
def globalcom2_generate(model, inputs: dict, method: GlobalCom2, new_tokens: int) -> GlobalCom2Result:
    """GlobalCom² greedy generation for LLaVA-NeXT processor ``inputs`` (batch 1, one image)."""
    from transformers import DynamicCache
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    size = inputs["image_sizes"][0].tolist()
    patches = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
    features, scores = vision_tokens(model, inputs["pixel_values"][0, :patches])
    args = (tuple(size), config.image_grid_pinpoints, config.vision_config.image_size, model.model.image_newline)
    packed, kept = select_tokens(features, scores, *args, method)
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == config.image_token_id)[:, 0]
    start, end = int(image[0]), int(image[-1]) + 1
    ids = torch.cat([ids[:start], torch.full((len(packed),), config.image_token_id), ids[end:]])
    embeds = model.model.language_model.embed_tokens(ids[None]).clone()
    embeds[0, start : start + len(packed)] = packed
    cache = DynamicCache()
    logits = prefill(model, embeds, cache)
    return GlobalCom2Result(kept, ids, logits, greedy(model, logits, cache, len(ids), new_tokens))
