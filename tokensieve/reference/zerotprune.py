"""Eager reference of Zero-TPrune (:class:`tokensieve.methods.ZeroTPrune`), written from the paper's description:
weighted PageRank as a plain power iteration from the uniform start, the head filter and the head combination as
masked means, the S-stage as a per-sample loop over the less-important group. Ties are broken like ONNX ``TopK``
(lower index first, stable sorts). The threshold form drops exactly, one image at a time (the reference a bucketed
artifact is held to).
"""

from __future__ import annotations

import torch

from tokensieve.methods.faces import register
from tokensieve.methods.zerotprune import ZeroTPrune
from tokensieve.reference.adapters import AttentionTensors
from tokensieve.reference.atp import drop, highest
from tokensieve.reference.merging import argsort_desc, head_mean_keys, pruning_placement, rows
from tokensieve.reference.sites import SiteContext, SiteResult


def page_rank(attention: AttentionTensors, iterations: int) -> torch.Tensor:
    """``[B, H, N]``: ``s <- Aᵀ s`` per head, ``iterations`` times from ``s = 1/N``, ``A`` the post-softmax
    attention of every query row (with the block's logit bias)."""
    probs = attention.probs()
    tokens = probs.shape[-1]
    s = torch.full((*probs.shape[:2], tokens), 1.0 / tokens, dtype=probs.dtype)
    for _ in range(iterations):
        s = torch.einsum("bhi,bhij->bhj", s, probs)
    return s


def combine_heads(s: torch.Tensor, method: ZeroTPrune) -> torch.Tensor:
    """``[B, N]``: the heads that pass the variance filter (all when none does), root mean square or mean."""
    keep = torch.ones(s.shape[:2], dtype=torch.bool)
    if method.head_filter is not None:
        low, high = method.head_filter
        variance = (s * s.shape[-1]).var(dim=-1, unbiased=False)
        keep = (variance >= low) & (variance <= high)
        keep[~keep.any(dim=1)] = True
    weights = keep.to(s.dtype).unsqueeze(-1)
    values = s.square() if method.eir else s
    combined = (values * weights).sum(dim=1) / weights.sum(dim=1)
    return combined.sqrt() if method.eir else combined


def similarity_pruned(scores: torch.Tensor, keys: torch.Tensor, group: int, count: int) -> torch.Tensor:
    """``[B, count]`` candidates of the ``group`` least important whose best cosine similarity to the more
    important ones is highest. ``scores [B, n]``, ``keys [B, n, d]`` normalised."""
    chosen = []
    for score, key in zip(scores, keys, strict=True):
        ranked = argsort_desc(score)
        more, less = ranked[: len(ranked) - group], ranked[len(ranked) - group :]
        best = (key[less] @ key[more].T).max(dim=-1).values
        chosen.append(less[argsort_desc(best)[:count]])
    return torch.stack(chosen)


def decide(h: torch.Tensor, scores: torch.Tensor, specials: int, threshold: float, forced: int | None) -> SiteResult:
    """The threshold form, one image: keep the candidates with ``n·s > threshold`` (``s`` the importance
    renormalised over the ``n`` candidates), or the ``forced`` most important."""
    if h.shape[0] != 1:
        raise ValueError("the adaptive reference runs one image at a time")
    s = scores[0] / scores[0].sum()
    return drop(h, s.shape[0] * s > threshold if forced is None else highest(s, forced), specials)


@register("site_reference", ZeroTPrune)
def site(
    h: torch.Tensor,
    attention: AttentionTensors,
    sizes: torch.Tensor | None,
    ctx: SiteContext,
    forced: int | None = None,
) -> SiteResult:
    method, S, params = ctx.method, ctx.specials, ctx.count.params
    scores = combine_heads(page_rank(attention, method.iterations_at(ctx.count.layer, ctx.depth)), method)[:, S:]
    if method.adaptive:
        return decide(h, scores, S, method.threshold, forced)
    if params["similar"]:
        keys = head_mean_keys(attention.key)[:, S:]
        pruned = similarity_pruned(scores, keys, params["group"], params["similar"])
        scores = scores.scatter(1, pruned, -1.0)  # below every importance (all >= 0)
    local = torch.sort(argsort_desc(scores)[:, : params["kept"]], dim=-1).values
    stream = torch.cat([h[:, :S], rows(h[:, S:], local)], dim=1)
    new_sizes = torch.cat([sizes[:, :S], rows(sizes[:, S:], local)], dim=1) if sizes is not None else None
    result = SiteResult(stream, new_sizes, {"kept": local + S}, local + S)
    result.assign, result.pruned = pruning_placement(h, local, S)
    return result
