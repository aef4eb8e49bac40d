"""The interface between :class:`tokensieve.reference.reduce.ReducedModel` and the per-method site functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.methods.base import Method, SiteCount


@dataclass(frozen=True)
class SiteContext:
    count: SiteCount
    method: Method
    specials: int
    depth: int


@dataclass
class SiteResult:
    """The reduced stream, the token sizes after the site (None when no method merges), and the index tensors
    that define the selection (same roles as the graph face exposes: ``kept``, ``src``/``dst``/``unm``, ...)."""

    stream: torch.Tensor
    sizes: torch.Tensor | None
    record: dict[str, torch.Tensor]
    # [B, n_out - S] position, in the stream entering the site, whose rotary rows each non-special output token
    # takes (the kept token; for a merge, the destination); None when the method gives none
    origin: torch.Tensor | None = None
    # [B, N_in] for each input token the output position holding it, or -1 - j when dropped as row j of ``pruned``
    # ([B, P, C], the dropped rows of the stream at the site); None when the method gives no such map
    assign: torch.Tensor | None = None
    pruned: torch.Tensor | None = None
