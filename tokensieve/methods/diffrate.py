"""DiffRate (Chen et al., ICCV 2023): prune by CLS attention and merge, in the same block, from a keep table.

Semantics (docs/methods.md#diffrate; written from the paper and the description of the official inference code):

* score: post-softmax CLS-row attention over the candidates, head mean (proportional attention included);
  candidates are sorted by it, descending (ties: lower index first); specials stay first;
* prune: keep the first ``prune[l]`` tokens of that order (counts include the special tokens);
* merge: of those, the tokens after position ``merge[l]`` merge into their most similar kept token (cosine of the
  block's hidden states, not keys; special tokens are never destinations) by an **unweighted** mean that includes
  the destination (``(x_dst + sum x_src) / (1 + n_src)``), exported as sums and counts, never as the
  ``scatter_reduce(mean)`` the dynamo exporter gets silently wrong;
* sizes: a merged token contributes ``size * similarity`` to its destination's size (the official inference
  rule), and later blocks add ``log(size)`` to their attention logits;
* output order: ``[specials, kept tokens in descending score order]``.

The table is a user-supplied per-block list (``prune=[...], merge=[...]``, one entry per block, counts including
special tokens, as in the official ``compression_rate.json``) or loaded from a JSON file (``table='file.json'``,
``key='ViT-S-DeiT/2.9'`` to pick an entry of a nested file). Blocks whose entries change nothing are not sites (the
official code still re-sorts there, which only permutes tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError, read_json
from tokensieve.methods.base import SiteCount, check_bool


def _counts(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise MethodSpecError(f"diffrate: {name} {value!r} is not a list of integers") from None
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise MethodSpecError(f"diffrate: {name} must be a non-empty list of positive token counts, got {value!r}")
    return tuple(value)


def load_table(path: str, key: str | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prune, merge) from a DiffRate JSON table; ``key`` walks nested objects, e.g. ``ViT-S-DeiT/2.9``."""
    data = read_json(path, MethodSpecError, "diffrate: the table")
    for part in key.split("/") if key else []:
        if not isinstance(data, dict) or part not in data:
            options = ", ".join(sorted(data)) if isinstance(data, dict) else "none"
            raise MethodSpecError(f"diffrate: table {path!r} has no entry {part!r} (available: {options})")
        data = data[part]
    if not isinstance(data, dict) or "prune_kept_num" not in data or "merge_kept_num" not in data:
        raise MethodSpecError(
            f"diffrate: table {path!r}{f' entry {key!r}' if key else ''} needs prune_kept_num and merge_kept_num "
            "lists; pass key='MODEL/RATE' to pick one from a nested file"
        )
    return _counts("prune_kept_num", data["prune_kept_num"]), _counts("merge_kept_num", data["merge_kept_num"])


@dataclass(frozen=True)
class DiffRate:
    prune: tuple[int, ...] | None = None
    merge: tuple[int, ...] | None = None
    table: str | None = None
    key: str | None = None
    prop_attn: bool = True
    name: ClassVar[str] = "diffrate"
    merges: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.prune is None and self.merge is None:
            if self.table is None:
                raise MethodSpecError("diffrate: give prune=[...] and merge=[...] lists or table='file.json'")
            prune, merge = load_table(self.table, self.key)
        elif self.prune is None or self.merge is None:
            raise MethodSpecError("diffrate: give both prune=[...] and merge=[...]")
        else:
            prune, merge = _counts("prune", self.prune), _counts("merge", self.merge)
        if len(prune) != len(merge):
            raise MethodSpecError(f"diffrate: prune has {len(prune)} entries but merge has {len(merge)}")
        for layer, (p, m) in enumerate(zip(prune, merge, strict=True)):
            if m > p:
                raise MethodSpecError(f"diffrate: block {layer} merges to {m} tokens, more than the {p} it keeps")
        object.__setattr__(self, "prune", prune)
        object.__setattr__(self, "merge", merge)
        check_bool("diffrate", "prop_attn", self.prop_attn)

    def layers_for(self, depth: int) -> tuple[int, ...]:
        return tuple(range(depth))

    def validate(self, tokens: int, specials: int, depth: int) -> None:
        if specials < 1:
            raise MethodSpecError("diffrate scores tokens by CLS attention, but this model has no CLS token")
        if len(self.prune) != depth:
            raise MethodSpecError(
                f"diffrate: the table has {len(self.prune)} entries but the model has {depth} blocks; it was made "
                "for another model"
            )
        if self.prune[0] > tokens:
            raise MethodSpecError(
                f"diffrate: the table starts with {self.prune[0]} tokens but the model has {tokens}; it was made "
                "for another model or resolution"
            )
        low = min(min(self.prune), min(self.merge))
        if low <= specials:
            raise MethodSpecError(
                f"diffrate: the table keeps {low} tokens somewhere, but the model's {specials} special token(s) "
                "are always kept; every count must exceed the number of special tokens"
            )

    def site(self, layer: int, tokens_in: int, specials: int, depth: int) -> SiteCount | None:
        prune = min(self.prune[layer], tokens_in)
        merge = min(self.merge[layer], prune)
        if prune == tokens_in and merge == prune:
            return None
        return SiteCount(layer, tokens_in, tokens_in - specials, merge, {"prune": prune, "merge": merge})

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prune": list(self.prune),
            "merge": list(self.merge),
            "table": self.table,
            "key": self.key,
            "prop_attn": self.prop_attn,
        }

    def describe(self) -> str:
        source = f"table={self.table!r}" + (f", key={self.key!r}" if self.key else "") if self.table else ""
        return f"diffrate({source or f'prune={list(self.prune)}, merge={list(self.merge)}'})"
