"""Eager building blocks shared by the reference methods: stable sorting, row gathers, merges.

Written for clarity with PyTorch's gather/scatter ops (vectorised over the batch), independently of the graph face
(which uses one-hot MatMuls): parity between the two is a real check, not a copy. Exported as-is with
``torch.onnx`` they are also the "naive route" the merging benchmark compares against.
"""

from __future__ import annotations

import torch


def argsort_desc(values: torch.Tensor) -> torch.Tensor:
    """Descending argsort along the last axis; ties keep the lower index first (like ONNX TopK)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, N]`` or ``[B, N, C]``: the rows ``index [B, k]`` of each sample."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def bipartite_match(scores: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching on ``scores [B, |A|, |B|]``: each A token's best B match scores it; the ``r``
    best-scoring A tokens merge. Returns ``(src, unm, dst)``: merging and unmerged A positions (score order) and the
    merging tokens' B positions."""
    node_max, node_idx = scores.max(dim=-1)
    edges = argsort_desc(node_max)
    src = edges[:, :r]
    return src, edges[:, r:], node_idx.gather(1, src)


def head_mean_keys(key: torch.Tensor) -> torch.Tensor:
    """ToMe/PiToMe metric: keys ``[B, H, N, d]`` averaged over heads and L2-normalised (no epsilon)."""
    return normalized(key.mean(dim=1))


def normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _scatter_add(base: torch.Tensor, assign: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    index = assign if values.dim() == 2 else assign.unsqueeze(-1).expand(-1, -1, values.shape[-1])
    return base.scatter_add(1, index, values)


def merge_into(
    dst: torch.Tensor,
    dst_sizes: torch.Tensor,
    src: torch.Tensor,
    src_sizes: torch.Tensor,
    assign: torch.Tensor,
    unweighted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add every source row into its destination ``assign [B, r]``: the size-weighted mean (ToMe's ``merge_wavg``)
    or, with ``unweighted``, the plain mean including the destination (DiffRate). New sizes: ``s_dst + sum s_src``.
    """
    sizes = _scatter_add(dst_sizes, assign, src_sizes)
    if unweighted:
        counts = _scatter_add(torch.ones_like(dst_sizes), assign, torch.ones_like(src_sizes))
        return _scatter_add(dst, assign, src) / counts.unsqueeze(-1), sizes
    total = _scatter_add(dst * dst_sizes.unsqueeze(-1), assign, src * src_sizes.unsqueeze(-1))
    return total / sizes.unsqueeze(-1), sizes


def placement(batch: int, tokens: int, placed: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``[B, tokens]``: where each input token goes (restoring a dense grid), from ``(positions [B, k], values
    [B, k] or [k])`` pairs; positions placed by no pair (the special tokens) keep their own index."""
    assign = torch.arange(tokens).repeat(batch, 1)
    for positions, values in placed:
        assign.scatter_(1, positions, values.expand_as(positions))
    return assign


def pruning_placement(h: torch.Tensor, local: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A pruning site's placement (``local [B, K]``: kept candidates, ascending, in output order after the ``S``
    specials): kept candidate ``i`` goes to ``S + i``, the pruned ones in ascending position to ``-1 - j``; and the
    pruned rows of ``h`` (None when nothing is pruned)."""
    B, N = h.shape[:2]
    dropped = torch.ones(B, N - S, dtype=torch.bool).scatter(1, local, False)
    pruned = dropped.nonzero()[:, 1].view(B, -1) + S  # row-major: ascending per sample, the same count in each
    placed = [(local + S, S + torch.arange(local.shape[1])), (pruned, -1 - torch.arange(pruned.shape[1]))]
    return placement(B, N, placed), (rows(h, pruned) if pruned.shape[1] else None)
