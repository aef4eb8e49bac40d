"""The eager reference of any combination of token-reduction methods on a timm or Hugging Face ViT.

:class:`ReducedModel` copies the model and wraps every block (see :mod:`.adapters`); as the forward pass reaches a
site it calls the method's site function (:mod:`.topk`, :mod:`.tome`, :mod:`.pitome`, :mod:`.diffrate`) and
records the index tensors that define its selection. Once a merging method has run, token sizes are tracked, every
later attention gets ``log(size)`` added to its logits through the attention's own additive-mask argument
(proportional attention), attention-pooling heads (``nn.MultiheadAttention``, e.g. HF SigLIP's MAP head, timm's
latent-query ``AttentionPoolLatent``, ``global_pool='map'``, and functional-SDPA heads such as HF AIMv2's) get the
same bias, and average pooling (timm's, HF BEiT's pooler) becomes size-weighted. Counts come from
:func:`tokensieve.methods.schedule`, the same function the graph pass uses.

With ``restore``, every wrapped block hands the full token grid to whatever reads its output (the next block takes
the reduced stream back; anything else, a tap or the model's head, sees ``[B, N0, C]``): each position takes the
features of the token holding it, or, dropped at a site, its own row of the stream there. The source map is built
from each site's placement of its input tokens (torch scatters) and recorded per site as ``source``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from tokensieve.errors import SourceError
from tokensieve.methods.base import Method, SiteCount, schedule
from tokensieve.reference import FACES
from tokensieve.reference.adapters import (
    AttentionTensors,
    biased_sdpa_pooling,
    find_blocks,
    size_weighted_head,
    special_tokens,
    wrap_blocks,
)
from tokensieve.reference.merging import rows
from tokensieve.reference.sites import SiteContext, SiteResult


class ReducedModel(nn.Module):
    """A copy of ``model`` with ``methods`` applied; ``.records[layer]`` holds the last forward's selections."""

    def __init__(self, model: nn.Module, methods: Sequence[Method], specials: int | None = None, restore: bool = False):
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.methods = list(methods)
        self.specials = special_tokens(self.model) if specials is None else specials
        self.depth = len(find_blocks(self.model)[1])
        self.merges = any(m.merges for m in self.methods)
        self.prop_attn = any(m.merges and getattr(m, "prop_attn", False) for m in self.methods)
        self.adaptive = any(getattr(m, "adaptive", False) for m in self.methods)
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        self.sample_records: list[dict[int, dict[str, torch.Tensor]]] = []
        self.forced: dict[int, int] = {}
        self.sizes: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # [B, n] original positions of the non-special tokens (None: all)
        self.missing_position: str | None = None  # why the tokens have no positions (a site gave none)
        self._tokens = 0  # tokens entering block 0
        self._sites: dict[int, tuple[Method, SiteCount]] = {}
        self.restore = restore
        self.source: torch.Tensor | None = None  # [B, N0] holder of every original token, -1 - j: bank row j
        self.bank: list[torch.Tensor] = []  # dropped rows per site
        self._current: torch.Tensor | None = None  # the last block's reduced output
        self._restored: torch.Tensor | None = None  # ... and the grid it handed out
        wrap_blocks(self.model, self)
        if self.merges and not restore:
            self._size_aware_pooling()
            size_weighted_head(self.model, self)
            biased_sdpa_pooling(self.model, self)

    # -- BlockHost ---------------------------------------------------------------------------------------------
    def attention_bias(self) -> torch.Tensor | None:
        if not self.prop_attn or self.sizes is None:
            return None
        return self.sizes.log()[:, None, None, :]

    def reduce(self, index: int, h: torch.Tensor, attention: AttentionTensors) -> torch.Tensor:
        if index == 0:
            plan = schedule(self.methods, h.shape[1], self.specials, self.depth)
            self._sites = {count.layer: (method, count) for method, count in plan.sites}
            self._tokens = h.shape[1]
        if index not in self._sites:
            return h
        method, count = self._sites[index]
        context = SiteContext(count, method, self.specials, self.depth)
        site = FACES.lookup("site_reference", method)
        if getattr(method, "adaptive", False):
            result = site(h, attention, self.sizes, context, forced=self.forced.get(index))
        else:
            result = site(h, attention, self.sizes, context)
        self.sizes = result.sizes
        self._follow(result, method, index)
        self.records[index] = {**result.record, **({"sizes": result.sizes} if result.sizes is not None else {})}
        if self.restore:
            self._follow_grid(result, method, index)
            self.records[index]["source"] = self.source
        return result.stream

    def _follow_grid(self, result: SiteResult, method: Method, index: int) -> None:
        if result.assign is None:
            raise SourceError(
                f"{method.name} at block {index} says nothing about where its input tokens go, so the token grid "
                "cannot be restored after it; export with --restore-grid off, or with a method that gives a source map "
                "(docs/methods.md#dense-outputs)"
            )
        banked = sum(part.shape[1] for part in self.bank)
        assign = torch.where(result.assign < 0, result.assign - banked, result.assign)
        if self.source is None:
            self.source = assign
        else:
            held = self.source >= 0
            self.source = torch.where(held, assign.gather(1, self.source.clamp(min=0)), self.source)
        if result.pruned is not None:
            self.bank.append(result.pruned)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """A block's input: the reduced stream behind the grid the previous block handed out."""
        if self.source is None:
            return x
        if x is not self._restored:
            raise SourceError(
                "a block's input is not the previous block's output (the model changes the stream between blocks), "
                "so the restored token grid cannot be taken back; export with --restore-grid off"
            )
        return self._current

    def leave(self, out: torch.Tensor) -> torch.Tensor:
        """A block's output as its readers see it: the full grid once tokens were reduced (with ``restore``)."""
        if self.source is None:
            return out
        pool = torch.cat([out, *self.bank], dim=1)
        index = torch.where(self.source >= 0, self.source, out.shape[1] - 1 - self.source)
        self._current, self._restored = out, rows(pool, index)
        return self._restored

    def _follow(self, result: SiteResult, method: Method, index: int) -> None:
        if result.origin is None:
            self.missing_position = f"{method.name} at block {index} gives no single position per output token"
        elif self.positions is None:
            self.positions = result.origin
        else:
            self.positions = self.positions.gather(1, result.origin - self.specials)

    def rope_rows(self, table: torch.Tensor) -> torch.Tensor:
        """Rotary ``table [..., N or N - S, D]`` at the tokens' original positions: ``[B, ..., n, D]`` with batch
        first and singleton axes up to the queries' rank (as timm lays tables out after patch dropout)."""
        index = self._original_positions("rotary position tables")
        if index is None:
            return table
        if table.shape[-2] == self._tokens - self.specials:
            index = index[:, self.specials :] - self.specials
        rows = table[..., index, :].movedim(-3, 0)  # [B, ..., n, D]
        while rows.dim() < 4:
            rows = rows.unsqueeze(1)
        return rows

    def bias_rows(self, bias: torch.Tensor) -> torch.Tensor:
        """Relative position ``bias [..., N, N]`` (leading axes: 1 and heads) at the tokens' original positions on
        both token axes: ``[B, H, n, n]``."""
        index = self._original_positions("relative position biases")
        if index is None:
            return bias
        tokens = bias.shape[-1]
        table = bias.reshape(-1, tokens, tokens)[:, index]  # [H, B, n, N]
        columns = index[None, :, None, :].expand(table.shape[0], -1, index.shape[1], -1)
        return table.gather(-1, columns).movedim(0, 1)

    def _original_positions(self, what: str) -> torch.Tensor | None:
        """``[B, S + n]`` original positions of every token (special tokens first, at ``0..S-1``); None before any
        site."""
        if self.missing_position is not None:
            raise SourceError(f"{what} cannot follow the tokens: {self.missing_position}")
        if self.positions is None:
            return None
        S, index = self.specials, self.positions
        return torch.cat([torch.arange(S).expand(index.shape[0], -1), index], dim=1)

    def forward(self, *args, **kwargs):
        if self.adaptive:
            return self.per_image(*args, **kwargs)
        self._reset()
        return self.model(*args, **kwargs)

    def _reset(self) -> None:
        self.records, self.sizes, self.positions, self.missing_position = {}, None, None, None
        self.source, self.bank, self._current, self._restored = None, [], None, None

    def per_image(self, pixels: torch.Tensor, forced: list[dict[int, int]] | None = None):
        """Adaptive methods: each image alone (its own token counts). Returns the model's outputs with equal-shape
        outputs stacked and variable-length ones as lists; ``forced[i]`` fixes image i's count per site.
        ``sample_records[i]`` holds image i's selections."""
        outputs, self.sample_records = [], []
        for i in range(pixels.shape[0]):
            self._reset()
            self.forced = forced[i] if forced else {}
            out = self.model(pixels[i : i + 1])
            outputs.append(out if isinstance(out, (tuple, list)) else (out,))
            self.sample_records.append(self.records)
        self.forced = {}
        merged = []
        for parts in zip(*outputs, strict=True):
            same = all(p.shape == parts[0].shape for p in parts)
            merged.append(torch.cat(parts, dim=0) if same else [p[0] for p in parts])
        return tuple(merged) if len(merged) > 1 else merged[0]

    # -- pooling with sizes ------------------------------------------------------------------------------------
    def _size_aware_pooling(self) -> None:
        timm_vit = next((m for m in self.model.modules() if hasattr(m, "global_pool") and _pool_name(m)), None)
        if timm_vit is not None:
            attn_pool = getattr(timm_vit, "attn_pool", None)
            if attn_pool is None:
                self._weighted_average_pool(timm_vit)
            elif hasattr(attn_pool, "latent") and getattr(attn_pool, "pos_embed", None) is None:
                attn_pool.register_forward_pre_hook(self._bias_latent_pool, with_kwargs=True)
            else:
                raise SourceError(
                    f"merging with timm's {type(attn_pool).__name__} pooling head is not supported (only the "
                    "latent-query attention pool, global_pool='map', without a position embedding)"
                )
        for module in self.model.modules():
            if isinstance(module, nn.MultiheadAttention):
                module.register_forward_pre_hook(self._bias_pooling_attention, with_kwargs=True)

    def _weighted_average_pool(self, vit: nn.Module) -> None:
        name, S = _pool_name(vit), self.specials
        original = getattr(vit, name)

        def pool(x: torch.Tensor, pool_type: str | None = None, **kwargs) -> torch.Tensor:
            if self.sizes is None or (pool_type or vit.global_pool) != "avg":
                return original(x, pool_type, **kwargs)
            include_prefix = getattr(vit, "pool_include_prefix", False)  # timm's Eva pools patches only
            weights = self.sizes if include_prefix else self.sizes[:, S:]
            x = x if include_prefix else x[:, S:]
            return (x * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True)

        setattr(vit, name, pool)

    def _bias_pooling_attention(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict):
        bias = self.attention_bias()
        if bias is None:
            return None
        query = args[0] if args else kwargs["query"]
        queries = query.shape[1] if module.batch_first else query.shape[0]
        mask = bias[:, 0].expand(-1, queries, -1).repeat_interleave(module.num_heads, dim=0)  # [B*H, L, N]
        kwargs["attn_mask"] = mask if kwargs.get("attn_mask") is None else kwargs["attn_mask"] + mask
        return args, kwargs

    def _bias_latent_pool(self, module: nn.Module, args: tuple, kwargs: dict):
        """timm's ``AttentionPoolLatent`` (``global_pool='map'``): its latent queries attend over the tokens it is
        given (all, or the patches after the special tokens) with ``log(size)`` added through its ``attn_mask``."""
        bias = self.attention_bias()
        if bias is None:
            return None
        tokens = (args[0] if args else kwargs["x"]).shape[1]
        mask = bias[..., bias.shape[-1] - tokens :]  # [B, 1, 1, N]: special tokens lead, so the patches are last
        given = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        return args[:1], {**kwargs, "attn_mask": mask if given is None else given + mask}


def _pool_name(model: nn.Module) -> str | None:
    """The method a timm model pools its tokens with: ``pool`` (VisionTransformer, Eva), ``_pool`` (NaFlexViT, which
    also takes ``patch_valid``); ``None`` for other modules."""
    return next((name for name in ("pool", "_pool") if callable(getattr(model, name, None))), None)
