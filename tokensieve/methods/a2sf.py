"""A2SF prompt-cache compression (accumulative attention score with a forgetting factor): the method's single
declaration.

Both faces read this dataclass: the eager reference (``tokensieve.reference.a2sf``) and the scoring step of the
prompt-cache pass (``tokensieve.graph_passes.prompt_cache``). Selection and positions:
:mod:`tokensieve.methods.prompt_cache`. Score (docs/methods.md#a2sf, the official code's current one-shot prefill
form), per layer and KV head: every prompt query row's post-softmax attention, weighted by
``forgetting_factor ** (T - 1 - q)`` (the newest row weighs 1, older rows are forgotten geometrically), summed over
the rows and over the query heads of the KV group. The last ``recent`` positions are always kept (16 in the official
code; README example: budget 256, forgetting factor 0.95). ``forgetting_factor=1`` is H2O's accumulated score over
the prompt (:mod:`tokensieve.methods.h2o` also keeps accumulating and evicting while decoding; ``h2o`` with a
``forgetting_factor`` below 1 is A2SF's decode-time form, the forgetting applied at every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.decoder import PlanInput
from tokensieve.methods.prompt_cache import PromptCacheCompression, positive_int


@dataclass(frozen=True)
class A2SF(PromptCacheCompression):
    """Keep the ``recent`` last prompt positions and the earlier ones with the highest forgetting-weighted
    accumulated attention, ``budget`` in all, per layer and KV head."""

    budget: int = 256
    recent: int = 16
    forgetting_factor: Fraction = Fraction(95, 100)
    name: ClassVar[str] = "a2sf"

    def __post_init__(self) -> None:
        positive_int(self.name, "recent", self.recent)
        factor = self.forgetting_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, Fraction)) or not 0 < factor <= 1:
            raise MethodSpecError(f"{self.name}: forgetting_factor must be in (0, 1], got {factor!r}")
        object.__setattr__(self, "forgetting_factor", Fraction(factor))
        self.check_budget()

    @property
    def protected(self) -> int:
        return self.recent

    def scoring_macs(self, p: PlanInput) -> int:  # the forgetting-weighted sum of every probability row
        return p.layers * p.length * p.length * p.heads

    def selection(self) -> str:
        return (
            "the earlier positions with the most attention accumulated over the prompt, rows weighted by "
            f"{float(self.forgetting_factor):g}^age"
        )

    def to_dict(self) -> dict[str, Any]:
        fields = {"budget": self.budget, "recent": self.recent, "forgetting_factor": str(self.forgetting_factor)}
        return {"name": self.name, **fields}

    def describe(self) -> str:
        factor = float(self.forgetting_factor)
        return f"a2sf(budget={self.budget}, recent={self.recent}, forgetting_factor={factor:g})"
