"""RazorAttention (ICLR 2025) KV-cache compression by head class: the method's single declaration.

Every face reads this dataclass: the retrieval-head probe and the decoder (``tokensieve.runtimes.razor``), the graph
pass on the prefill and fixed decode graphs (``tokensieve.graph_passes.razor``) and the eager reference
(``tokensieve.reference.razor``). Semantics (docs/methods.md#razorattention), per layer and KV head:

* **head classes**, found once and data-free at export: a random sequence of ``probe`` token ids (seeded by
  ``seed``) repeated twice runs through the prefill; in the second copy a query head's *echo* score is its mean
  attention to the previous occurrence of its own token, its *induction* score the mean attention to the token after
  that occurrence. A KV head scores the mean of its query heads (GQA: the KV head is the unit). The ``echo`` and
  ``induction`` fractions of all KV heads (of all layers, ``ceil``) with the highest scores of each kind are the
  *retrieval heads*; export stores them as ``heads`` (``(layer, kv_head)`` pairs, ascending) in the manifest;
* retrieval heads keep the whole prompt cache;
* every other head keeps the first ``sink`` positions and the last ``L = max(window, T // ratio)`` of a
  ``T``-position prompt; the ``D = max(T - sink - L, 0)`` positions between are replaced by one **compensation
  token** (key = mean of their keys, value = mean of their values, keys after RoPE) that attention weighs as ``D``
  tokens (logit bias ``log D``; no compensation token when ``D = 0``);
* compression happens once, at the end of prefill; new tokens are cached in every head at absolute positions.

Cache layout (what :meth:`layout` returns and parity compares): every layer's prompt cache has ``T + 1`` entries per
KV head. A retrieval head holds positions ``0..T-1`` and one unused entry; another head holds its sinks, the
compensation token (marked ``COMPENSATION``), its recent positions, then ``D`` unused entries (``UNUSED``). The new
token at position ``p`` is written at entry ``p`` of retrieval heads and ``p + 1 - D`` of the others: two cache
lengths per layer, one per head class.

Cache memory: in the fixed decode graph of a ``C``-slot export each layer keeps its retrieval heads and its other
heads in separate cache tensors: ``C`` slots for the first, :meth:`local_capacity` ``= min(C, sink + L(C) +
new_tokens)`` for the others (``L(C)``: the largest ``L`` a prompt of at most ``C`` positions gives; the prompt
entries such a head holds are at most ``sink + 1 + L``, and the last new token is never written), so generations of
at most ``new_tokens`` new tokens fit.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.decoder import DecoderContext, DecoderMethod, PlanCost, PlanInput
from tokensieve.methods.prompt_cache import positive_int

COMPENSATION = -2  # the layout's mark for the compensation token
UNUSED = -1  # the layout's mark for an entry no position occupies (yet)
Head = tuple[int, int]  # (layer, kv_head)


def _fraction(name: str, value: Any) -> Fraction:
    """``value`` (a number, or the string a manifest stores) as a fraction in [0, 1]."""
    try:
        fraction = Fraction(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        fraction = None
    if fraction is None or not 0 <= fraction <= 1:
        raise MethodSpecError(f"razor: {name} must be a fraction of the KV heads in [0, 1], got {value!r}")
    return fraction


def _heads(value: Any) -> tuple[Head, ...] | None:
    """The retrieval heads as ascending ``(layer, kv_head)`` pairs (``None``: found at export)."""
    if value is None:
        return None
    try:
        heads = tuple(sorted((int(layer), int(head)) for layer, head in value))
    except (TypeError, ValueError):
        heads = ()
    if (value and not heads) or any(min(pair) < 0 for pair in heads) or len(set(heads)) != len(heads):
        raise MethodSpecError(
            f"razor: heads must be distinct (layer, kv_head) pairs of non-negative integers, got {value!r}; leave it "
            "out to find the retrieval heads at export"
        )
    return heads


@dataclass(frozen=True)
class RazorAttention(DecoderMethod):
    """Full cache on the retrieval heads (echo + induction heads); on the others ``sink`` attention sinks, the last
    ``max(window, T // ratio)`` positions and one compensation token for what lies between (paper defaults: 4 sinks,
    window 4000, ratio 5, 1 % echo and 14 % induction heads)."""

    sink: int = 4
    window: int = 4000
    ratio: int = 5
    echo: Fraction = Fraction(1, 100)
    induction: Fraction = Fraction(14, 100)
    probe: int = 256
    seed: int = 0
    new_tokens: int = 256
    heads: tuple[Head, ...] | None = None
    several_images: ClassVar[bool] = True
    name: ClassVar[str] = "razor"
    growing_cache: ClassVar[bool] = False  # two cache lengths per layer live in the fixed decode graph only
    data_dependent: ClassVar[bool] = False
    kept_fields: ClassVar[tuple[str, ...]] = ("cache_positions",)  # [layers, kv_heads, T + 1]: the layout

    def __post_init__(self) -> None:
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise MethodSpecError(f"razor: sink must be a number of positions >= 0, got {self.sink!r}")
        positive_int(self.name, "window", self.window)
        positive_int(self.name, "ratio", self.ratio)
        positive_int(self.name, "probe", self.probe)
        positive_int(self.name, "new_tokens", self.new_tokens)
        if self.probe < 2:
            raise MethodSpecError(
                f"razor: probe must be at least 2 tokens (induction needs a next token), got {self.probe}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MethodSpecError(f"razor: seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "echo", _fraction("echo", self.echo))
        object.__setattr__(self, "induction", _fraction("induction", self.induction))
        object.__setattr__(self, "heads", _heads(self.heads))

    # -- head classes ------------------------------------------------------------------------------------------
    def probe_ids(self, vocab: int) -> list[int]:
        """The probe: ``probe`` seeded random token ids below ``vocab``, repeated twice."""
        rng = random.Random(self.seed)
        first = [rng.randrange(vocab) for _ in range(self.probe)]
        return first + first

    def class_counts(self, kv_heads: int) -> tuple[int, int]:
        """How many echo and induction heads are chosen among ``kv_heads`` KV heads (all layers)."""
        return math.ceil(self.echo * kv_heads), math.ceil(self.induction * kv_heads)

    def choose(self, echo: list[float], induction: list[float]) -> tuple[int, ...]:
        """Retrieval heads (flat indices ``layer * kv_heads + head``, ascending) from the KV heads' echo and
        induction scores: the top of each kind (lower index first on ties), united."""
        counts = self.class_counts(len(echo))
        chosen: set[int] = set()
        for scores, count in zip((echo, induction), counts, strict=True):
            chosen.update(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:count])
        return tuple(sorted(chosen))

    def retrieval(self, layer: int, kv_heads: int) -> list[bool]:
        """Per KV head of ``layer``: whether it is a retrieval head (after export settled ``heads``)."""
        if self.heads is None:
            raise MethodSpecError("razor: the retrieval heads are not known yet; they are found when exporting")
        return [(layer, head) in self.heads for head in range(kv_heads)]

    # -- counts ------------------------------------------------------------------------------------------------
    def recent(self, length: int) -> int:
        """``L``: the recent positions a non-retrieval head keeps of a ``length``-position prompt."""
        return max(self.window, length // self.ratio)

    def dropped(self, length: int) -> int:
        """``D``: the positions a non-retrieval head folds into its compensation token."""
        return max(length - self.sink - self.recent(length), 0)

    def layout(self, length: int, retrieval: bool) -> list[int]:
        """The ``length + 1`` cache entries of one KV head after prefill: positions, ``COMPENSATION``, ``UNUSED``."""
        if retrieval:
            return [*range(length), UNUSED]
        sink, dropped = min(self.sink, length), self.dropped(length)
        return [*range(sink), COMPENSATION, *range(sink + dropped, length), *[UNUSED] * dropped]

    def cached_prompt(self, length: int) -> int:
        return length + 1  # the entries of the layout (the compensation entry included)

    def local_capacity(self, capacity: int) -> int:
        """Slots of a non-retrieval head's cache in a ``capacity``-slot fixed decode graph (module docstring)."""
        return min(capacity, self.sink + self.recent(capacity) + self.new_tokens)

    # -- protocol ----------------------------------------------------------------------------------------------
    def validate(self, ctx: DecoderContext) -> None:
        if self.heads is not None and any(layer >= ctx.layers for layer, _ in self.heads):
            raise MethodSpecError(f"razor: heads name a layer beyond the model's {ctx.layers} decoder layers")

    def plan(self, p: PlanInput) -> PlanCost:
        kv_heads = p.layers * (p.kv_heads or p.heads)
        counted = min(sum(self.class_counts(kv_heads)), kv_heads)
        retrieval = counted if self.heads is None else len(self.heads)  # settled: the artifact's own heads
        total, local = p.length + p.new_tokens, p.length + p.new_tokens - self.dropped(p.length)
        held = local + (self.dropped(p.length) > 0)  # the compensation token
        mean = (retrieval * total + (kv_heads - retrieval) * held) // kv_heads
        slots = p.length + 1 + p.new_tokens
        names = ("retrieval", "sinks + recent + compensation")
        classes = dict(zip(names, ((retrieval, total), (kv_heads - retrieval, held)), strict=True))
        class_slots = dict(zip(names, (slots, self.local_capacity(slots)), strict=True))
        return PlanCost([p.length] * p.layers, [mean] * p.layers, slots, classes=classes, class_slots=class_slots)

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        heads = (
            "found at export"
            if self.heads is None
            else f"{len(self.heads)} of {decoder['layers'] * decoder['kv_heads']}"
        )
        return (
            f"retrieval heads ({heads}: echo and induction heads on a repeated random sequence) cache the whole "
            f"prompt; every other KV head keeps {self.sink} sinks, the last max({self.window}, T // {self.ratio}) "
            "positions and one compensation token (mean key and value of the rest, weighted by their count); per layer "
            f"two cache tensors in the fixed decode graph, {decoder['capacity']} slots for retrieval heads and "
            f"{self.local_capacity(decoder['capacity'])} for the others (up to {self.new_tokens} new tokens)"
        )

    def to_dict(self) -> dict[str, Any]:
        fields = {"sink": self.sink, "window": self.window, "ratio": self.ratio, "probe": self.probe, "seed": self.seed}
        fields["new_tokens"] = self.new_tokens
        heads = {} if self.heads is None else {"heads": [list(pair) for pair in self.heads]}
        return {"name": self.name, **fields, "echo": str(self.echo), "induction": str(self.induction), **heads}

    def describe(self) -> str:
        heads = "" if self.heads is None else f", heads={[list(pair) for pair in self.heads]}"
        return (
            f"razor(sink={self.sink}, window={self.window}, ratio={self.ratio}, echo={float(self.echo):g}, "
            f"induction={float(self.induction):g}, probe={self.probe}, seed={self.seed}, new_tokens={self.new_tokens}"
            f"{heads})"
        )
