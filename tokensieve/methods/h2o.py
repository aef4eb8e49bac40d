"""H2O heavy-hitter KV-cache eviction (NeurIPS 2023) with a fixed cache budget: the method's single declaration.

Both faces read this dataclass: the eager reference (``tokensieve.reference.h2o``) and the graph face (the
prompt-cache pass on the prefill graph, ``tokensieve.graph_passes.prompt_cache``, and the eviction pass on the
fixed-capacity decode graph, ``tokensieve.graph_passes.heavy_hitters``). Semantics (docs/methods.md#h2o, the official
real-drop form ``H2OKVCache_LayerWise`` with ``hh_size = budget - recent``), per layer and KV head:

* a position's score is the attention it has received, accumulated over every query since it entered the cache
  (post-softmax probabilities, summed over the query heads of the KV group);
* after prefill the cache holds ``budget`` prompt positions: the last ``recent`` plus the earlier ones with the
  highest accumulated score over all prompt queries (A2SF's score with ``forgetting_factor=1``, so H2O is that
  selection plus eviction while decoding);
* every decode step attends to the cached positions and the new token (``budget + 1`` keys), adds the step's
  attention to the scores (the new token starts with its own), and, when ``budget + 1`` positions are cached, evicts
  the one with the lowest score among those older than the last ``recent`` positions;
* ``forgetting_factor`` < 1 is A2SF's decode-time form (docs/methods.md#a2sf: ``acc <- factor * acc + step``): the
  scores are multiplied by the factor before each step's attention is added, and prefill's scores are A2SF's
  (every prompt row weighted ``factor ** (T - 1 - q)``), so a position's score is always
  ``sum_q factor ** (n - q) * attention(q, position)`` over the queries ``q`` up to the current ``n``. 1 (the
  default) is plain H2O;
* storage: the fixed cache has ``budget + 1`` slots (more are allowed and stay unused); the prompt fills slots
  ``0..K-1`` in position order, new tokens take the next free slot and, once the cache is full, the slot just
  evicted. Ties in the eviction go to the lower slot (ONNX ``TopK``), which the eager reference mirrors;
* keys keep their RoPE rotation at their original positions; new tokens continue at absolute positions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.methods.a2sf import A2SF
from tokensieve.methods.decoder import PlanCost, PlanInput

STATE_BYTES = 12  # per slot, layer and KV head: the float32 score and the int64 position


@dataclass(frozen=True)
class H2O(A2SF):
    """Keep ``budget`` positions per layer and KV head: the ``recent`` newest and the heaviest hitters by
    accumulated (with ``forgetting_factor`` < 1: A2SF's decayed) attention, evicting one per decode step once the
    cache is full."""

    budget: int = 256
    recent: int = 128
    forgetting_factor: Fraction = Fraction(1)
    name: ClassVar[str] = "h2o"
    growing_cache: ClassVar[bool] = False  # evicts in the fixed decode graph, which has no growing-cache form
    evicts: ClassVar[bool] = True
    scores_output: ClassVar[bool] = True  # the accumulated scores decoding goes on adding to
    kept_fields: ClassVar[tuple[str, ...]] = ("cache_positions", "retained_positions")  # prefill's, then the end's

    def slots(self) -> int:
        """Cache slots H2O uses: the budget plus the one the next token is written to."""
        return self.budget + 1

    def window(self, length: int) -> tuple[int, int]:
        """``(budget, recent)`` after a ``length``-position prompt: the positions every layer and KV head holds once
        the cache is full (the decoders use ``budget + 1`` slots) and the protected most recent ones (a method whose
        counts follow the prompt overrides it)."""
        return self.budget, self.recent

    def fixed_capacity(self) -> int:
        return self.slots()  # more would stay unused

    def plan(self, p: PlanInput) -> PlanCost:
        cached = [min(p.length + p.new_tokens, self.budget)] * p.layers
        return replace(super().plan(p), cached=cached, slots=self.slots(), unbounded=True, state_bytes=STATE_BYTES)

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        factor = float(self.forgetting_factor)
        forgetting = "" if factor == 1 else f", older attention weighted by {factor:g} per step (A2SF)"
        return (
            f"every layer and KV head caches at most {self.budget} positions: the last {self.recent} and the heavy "
            f"hitters (the most attention accumulated since they were cached{forgetting}); prefill keeps them among "
            f"the prompt, then the decode graph evicts the lightest older one per step once {self.slots()} are cached"
        )

    def to_dict(self) -> dict[str, Any]:
        factor = {} if self.forgetting_factor == 1 else {"forgetting_factor": str(self.forgetting_factor)}
        return {"name": self.name, "budget": self.budget, "recent": self.recent, **factor}

    def describe(self) -> str:
        factor = "" if self.forgetting_factor == 1 else f", forgetting_factor={float(self.forgetting_factor):g}"
        return f"h2o(budget={self.budget}, recent={self.recent}{factor})"
