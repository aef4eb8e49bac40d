"""What the prompt-cache compression methods (SnapKV, A2SF, and H2O's prefill) share: a budget of cached prompt
positions per layer and KV head, the last ``protected`` positions always among them, chosen once at the end of
prefill.

The graph face is one pass (``tokensieve.graph_passes.prompt_cache``) with a scoring step per method and a shared
selection step; the eager face is ``tokensieve.reference.prompt_cache``. Semantics (docs/methods.md#prompt-cache):

* a prompt of ``T <= budget`` positions is cached whole;
* otherwise each layer and KV head keeps the last ``protected`` positions plus the ``budget - protected`` earlier
  positions with the highest score (ties: lower index first, like ONNX TopK), stored in ascending position order;
* cached keys keep their RoPE rotation (original positions); new tokens continue at absolute positions and are cached
  after the compressed prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.decoder import DecoderContext, DecoderMethod, PlanCost, PlanInput

TOPK_LIMIT = 3840  # TensorRT's TopK K limit


def positive_int(method: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MethodSpecError(f"{method}: {name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class PromptCacheCompression(DecoderMethod):
    """Base of the prompt-cache compression methods (``budget`` positions per layer and KV head)."""

    budget: int = 2048
    several_images: ClassVar[bool] = True
    name: ClassVar[str] = ""
    data_dependent: ClassVar[bool] = False
    kept_fields: ClassVar[tuple[str, ...]] = ("cache_positions",)  # per layer and KV head
    scores_output: ClassVar[bool] = False  # prefill also outputs the kept positions' scores (cache_scores)

    @property
    def protected(self) -> int:
        """How many of the last prompt positions are always kept."""
        raise NotImplementedError

    @property
    def prompt_share(self) -> Fraction | None:
        """``None``: the fixed ``budget``. Otherwise the cache keeps ``floor(share * T)`` positions of a ``T``-position
        prompt (the graphs derive the count from the prompt's shape) and ``recent_share`` of them are protected."""
        return None

    @property
    def recent_share(self) -> Fraction | None:
        """With ``prompt_share``: the protected positions are ``floor(recent_share * kept)``."""
        return None

    def check_budget(self) -> None:
        positive_int(self.name, "budget", self.budget)
        if self.protected >= self.budget:
            raise MethodSpecError(
                f"{self.name}: the {self.protected} always-kept recent positions must be fewer than budget="
                f"{self.budget} (the budget holds them plus the selected earlier positions)"
            )

    def protected_count(self, length: int) -> int:
        """Positions of a ``length``-position prompt always kept (the last ones)."""
        return min(self.protected, length)

    def kept_count(self, length: int) -> int:
        """Positions a ``length``-position prompt keeps per layer and KV head."""
        return min(self.budget, length)

    def cached_prompt(self, length: int) -> int:
        return self.kept_count(length)

    def scoring_macs(self, p: PlanInput) -> int:
        """The method's scoring products in prefill, every layer."""
        raise NotImplementedError

    def selection(self) -> str:
        """Which earlier positions the budget keeps besides the last ``protected``, in words."""
        raise NotImplementedError

    def plan(self, p: PlanInput) -> PlanCost:
        kept = self.kept_count(p.length) + p.new_tokens
        return PlanCost([p.length] * p.layers, [kept] * p.layers, kept, self.scoring_macs(p))

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        return (
            f"after prefill every layer and KV head caches at most {self.budget} prompt positions: the last "
            f"{self.protected} and {self.selection()}; new tokens are cached after them at their absolute positions"
        )

    def validate(self, ctx: DecoderContext) -> None:
        capacity = ctx.capacity
        if self.budget >= capacity:
            raise MethodSpecError(
                f"{self.name}: budget={self.budget} leaves no cache slot for new tokens in a {capacity}-slot decode "
                f"graph; use budget <= {capacity - 1} or a larger --capacity"
            )
        if self.budget > TOPK_LIMIT:
            raise MethodSpecError(
                f"{self.name}: budget={self.budget} needs a TopK over more than {TOPK_LIMIT} positions, which "
                f"TensorRT rejects; use budget <= {TOPK_LIMIT}"
            )
