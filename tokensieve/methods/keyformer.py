"""Keyformer KV-cache eviction (MLSys 2024) in a fixed-capacity decode graph: the method's single declaration.

Keyformer is H2O's eviction (:mod:`tokensieve.methods.h2o`: the last ``recent`` positions plus the ``key`` heaviest
earlier ones per layer and KV head, one eviction per decode step) with another score (docs/methods.md#keyformer):

* a position's step score is the Gumbel-softmax of the step's raw attention logits,
  ``softmax((q·kᵀ/sqrt(d) + mask + g) / tau_t)`` with ``g ~ Gumbel(0, 1)`` drawn per layer, query head, query row
  and key; summed over the query rows (prefill: every prompt row) and the query heads of each KV group, and
  accumulated over the steps (a new token starts with its own, an evicted position's score leaves with it);
* the temperature rises linearly over the generation: ``tau_t = tau_init + t * (tau_end - tau_init) /
  max_new_tokens``, ``t`` the decode step (0 for the prompt);
* the budget follows the prompt of ``T`` positions: ``floor(T * kv_cache / 100)`` positions, of which
  ``floor(budget * recent_percent / 100)`` recent (the official integer expressions; exact integer arithmetic
  here), or explicit counts ``budget`` and ``recent`` (H2O's, kept whole when the prompt is not longer);
* the noise is not drawn in the graphs: the host draws it (:func:`tokensieve.runtimes.keyformer.gumbel_noise`, seeded
  by ``seed`` and the step) and feeds it with ``tau_t`` as graph inputs, and the eager reference draws the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.decoder import DecoderContext, PlanCost, PlanInput
from tokensieve.methods.h2o import H2O, STATE_BYTES
from tokensieve.methods.prompt_cache import TOPK_LIMIT, positive_int


def _number(name: str, value: Any, low: int, high: int | None, what: str) -> Fraction:
    """``value`` (a number, or the exact string a manifest stores) as a Fraction in ``(low, high)``."""
    try:
        number = None if isinstance(value, (bool, float)) else Fraction(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number <= low or (high is not None and number >= high):
        raise MethodSpecError(f"keyformer: {name} must be {what}, got {value!r}")
    return number


@dataclass(frozen=True)
class Keyformer(H2O):
    """Keep the ``recent`` newest positions and the ``key`` ones with the highest accumulated Gumbel-softmax score per
    layer and KV head (a share of the prompt, or explicit counts), evicting one per decode step."""

    budget: int | None = None  # explicit counts (both or neither); None: the shares of the prompt below
    recent: int | None = None
    forgetting_factor: Fraction = Fraction(1)
    kv_cache: Fraction = Fraction(60)  # percent of the prompt's positions the cache keeps
    recent_percent: Fraction = Fraction(30)  # percent of the kept positions that are the most recent
    tau_init: Fraction = Fraction(1)
    tau_end: Fraction = Fraction(2)
    seed: int = 0
    name: ClassVar[str] = "keyformer"
    # prefill's kept positions, those cached at the end, and the one every decode step evicted (so every step's cache)
    kept_fields: ClassVar[tuple[str, ...]] = ("cache_positions", "retained_positions", "evicted_positions")

    def __post_init__(self) -> None:
        if (self.budget is None) != (self.recent is None):
            raise MethodSpecError(
                "keyformer: give both budget and recent (explicit counts) or neither (kv_cache and recent_percent, "
                "shares of the prompt)"
            )
        if self.budget is not None:
            positive_int(self.name, "recent", self.recent)
            self.check_budget()
        if self.forgetting_factor != 1:
            raise MethodSpecError("keyformer: forgetting_factor is A2SF's; use h2o(forgetting_factor=...) for it")
        for name in ("kv_cache", "recent_percent"):
            object.__setattr__(self, name, _number(name, getattr(self, name), 0, 100, "a percentage in (0, 100)"))
        for name in ("tau_init", "tau_end"):
            object.__setattr__(self, name, _number(name, getattr(self, name), 0, None, "a positive number"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise MethodSpecError(f"keyformer: seed must be an integer >= 0, got {self.seed!r}")

    @property
    def prompt_share(self) -> Fraction | None:
        return None if self.budget is not None else self.kv_cache / 100

    @property
    def recent_share(self) -> Fraction | None:
        return None if self.budget is not None else self.recent_percent / 100

    def counts(self, length: int) -> tuple[int, int]:
        """``(kept, recent)`` for a ``length``-position prompt: the positions every layer and KV head keeps, and how
        many of them are the most recent (``int(T * kv_cache / 100)`` and ``int(kept * recent / 100)``)."""
        if self.budget is not None:
            return min(self.budget, length), self.recent
        kept = length * self.kv_cache.numerator // (100 * self.kv_cache.denominator)
        return kept, kept * self.recent_percent.numerator // (100 * self.recent_percent.denominator)

    def kept_count(self, length: int) -> int:
        return self.counts(length)[0]

    def protected_count(self, length: int) -> int:
        return min(self.counts(length)[1], length)

    def window(self, length: int) -> tuple[int, int]:
        return (self.budget, self.recent) if self.budget is not None else self.counts(length)

    def tau(self, step: int, new_tokens: int) -> Fraction:
        """The Gumbel-softmax temperature of decode step ``step`` (0: the prompt) of a ``new_tokens`` generation."""
        return self.tau_init + step * (self.tau_end - self.tau_init) / max(new_tokens, 1)

    @property
    def protected(self) -> int:
        return self.recent if self.recent is not None else 0

    def fixed_capacity(self) -> int | None:
        return None if self.budget is None else self.slots()

    def validate(self, ctx: DecoderContext) -> None:
        if self.budget is not None:
            return super().validate(ctx)
        if ctx.capacity - 1 > TOPK_LIMIT:
            raise MethodSpecError(
                f"keyformer: a {ctx.capacity}-slot cache holds prompt budgets of up to {ctx.capacity - 1} positions, "
                f"whose TopK over more than {TOPK_LIMIT} TensorRT rejects; use --capacity <= {TOPK_LIMIT + 1}"
            )

    def scoring_macs(self, p: PlanInput) -> int:
        return 0  # element-wise (noise, temperature, softmax, sums): no MACs by the counting convention

    def plan(self, p: PlanInput) -> PlanCost:
        kept = self.window(p.length)[0]
        cached = [min(p.length + p.new_tokens, kept)] * p.layers
        return PlanCost([p.length] * p.layers, cached, kept + 1, 0, unbounded=True, state_bytes=STATE_BYTES)

    def _budget_text(self) -> str:
        if self.budget is not None:
            return f"at most {self.budget} positions: the last {self.recent}"
        return f"{float(self.kv_cache):g}% of the prompt's positions, {float(self.recent_percent):g}% of them the last"

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        return (
            f"every layer and KV head caches {self._budget_text()} and the key tokens (the most Gumbel-softmax "
            f"attention accumulated since they were cached, temperature {float(self.tau_init):g} -> "
            f"{float(self.tau_end):g} over the generation, noise seeded {self.seed} and fed by the host); prefill "
            "keeps them among the prompt, then the decode graph evicts the lightest older one per step"
        )

    def to_dict(self) -> dict[str, Any]:
        counts = {"budget": self.budget, "recent": self.recent} if self.budget is not None else {}
        shares = {"kv_cache": str(self.kv_cache), "recent_percent": str(self.recent_percent)} if not counts else {}
        taus = {"tau_init": str(self.tau_init), "tau_end": str(self.tau_end)}
        return {"name": self.name, **counts, **shares, **taus, "seed": self.seed}

    def describe(self) -> str:
        fields = {k: v for k, v in self.to_dict().items() if k != "name"}
        text = ", ".join(f"{k}={float(Fraction(v)) if isinstance(v, str) else v:g}" for k, v in fields.items())
        return f"keyformer({text})"
