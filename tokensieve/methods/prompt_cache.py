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
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError

TOPK_LIMIT = 3840  # TensorRT's TopK K limit


def positive_int(method: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MethodSpecError(f"{method}: {name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class PromptCacheCompression:
    """Base of the prompt-cache compression methods (``budget`` positions per layer and KV head)."""

    budget: int = 2048
    name: ClassVar[str] = ""
    target: ClassVar[str] = "mllm"

    @property
    def protected(self) -> int:
        """How many of the last prompt positions are always kept."""
        raise NotImplementedError

    def check_budget(self) -> None:
        positive_int(self.name, "budget", self.budget)
        if self.protected >= self.budget:
            raise MethodSpecError(
                f"{self.name}: the {self.protected} always-kept recent positions must be fewer than budget="
                f"{self.budget} (the budget holds them plus the selected earlier positions)"
            )

    def kept_count(self, length: int) -> int:
        """Positions a ``length``-position prompt keeps per layer and KV head."""
        return min(self.budget, length)

    def validate(self, capacity: int) -> None:
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
