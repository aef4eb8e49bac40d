"""Eager reference of ATP-style adaptive pruning (:class:`tokensieve.methods.ATPPrune`): exact, variable-length
dropping, one image at a time (a batch of different counts is not a tensor). Records the kept positions.

``forced`` (tests and edge-count parity): keep exactly that many candidates, the highest by priority (grid first,
then score), instead of the data-dependent rule -- the same selection a bucket makes when it truncates.
"""

from __future__ import annotations

import torch

from tokensieve.methods.atp import ATPPrune
from tokensieve.methods.faces import register
from tokensieve.reference.adapters import AttentionTensors
from tokensieve.reference.merging import argsort_desc
from tokensieve.reference.sites import SiteContext, SiteResult
from tokensieve.reference.topk import score


def normalized_scores(attention: AttentionTensors, specials: int, kind: str) -> torch.Tensor:
    """CLS-row attention over the candidates (``kind="mean_received"``: the attention each receives, mean over every
    query row), head mean, renormalised to sum to 1: ``[B, n]``."""
    s = score(attention, kind)[:, specials:]
    return s / s.sum(dim=-1, keepdim=True)


def grid_mask(method, candidates: int, first_site: bool) -> torch.Tensor:
    mask = torch.zeros(candidates, dtype=torch.bool)
    if first_site:
        mask[method.grid_positions(candidates)] = True
    return mask


def keep_mask(method, s: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The data-dependent keep rule for one image's normalised scores ``[n]``."""
    n = s.shape[-1]
    if method.threshold is not None:
        kept = n * s > method.threshold
    else:
        order = argsort_desc(s)
        before = torch.cumsum(s[order], dim=-1) - s[order]  # mass accumulated before each rank
        kept = torch.zeros(n, dtype=torch.bool)
        kept[order[before < method.mass]] = True
    return kept | grid


@register("site_reference", ATPPrune)
def site(
    h: torch.Tensor, attention: AttentionTensors, sizes, ctx: SiteContext, forced: int | None = None
) -> SiteResult:
    if h.shape[0] != 1:
        raise ValueError("the adaptive reference runs one image at a time")
    method, S = ctx.method, ctx.specials
    s = normalized_scores(attention, S, method.resolved_score(S))[0]
    grid = grid_mask(method, s.shape[0], ctx.count.layer == method.layers[0])
    kept = keep_mask(method, s, grid) if forced is None else highest(s + 2.0 * grid, forced)
    return drop(h, kept, S)


def highest(priority: torch.Tensor, count: int) -> torch.Tensor:
    """``[n]`` bool: the ``count`` highest-priority candidates (ties: lower index first), what a bucket that
    truncates keeps."""
    kept = torch.zeros(priority.shape, dtype=torch.bool)
    kept[argsort_desc(priority)[:count]] = True
    return kept


def drop(h: torch.Tensor, kept: torch.Tensor, specials: int) -> SiteResult:
    """One image's stream ``h [1, N, C]`` with the candidates ``kept [n]`` (bool) only, in their order."""
    positions = torch.nonzero(kept).reshape(-1)
    stream = torch.cat([h[:, :specials], h[:, specials:][:, positions]], dim=1)
    kept_positions = (positions + specials)[None]
    return SiteResult(stream, None, {"kept": kept_positions}, origin=kept_positions)
