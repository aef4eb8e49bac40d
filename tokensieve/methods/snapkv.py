"""SnapKV prompt-cache compression (NeurIPS 2024) at the end of an MLLM prefill: the method's single declaration.

Both faces read this dataclass: the eager reference (``tokensieve.reference.snapkv``) and the graph pass
(``tokensieve.graph_passes.snapkv`` on the prefill graph; the decode graphs are unchanged, the runtime writes new
tokens after the compressed prompt). Semantics (METHODS.md §5.5):

* when: at the end of prefill, in every layer, when the prompt has more than ``budget`` positions; the prompt's own
  logits are those of the full prompt (compression only changes what later tokens see);
* score: per layer, the attention probabilities of the last ``window`` prompt positions (query rows, causal inside
  the window), summed over those rows, for the prefix columns (the window's columns score 0); mean over the query
  heads of each KV group (kvpress's GQA rule: the official code stores a GQA-expanded cache and selects per query
  head, which would multiply the cache by ``heads / kv_heads``; both agree when ``heads == kv_heads``); then a 1-D
  pooling over positions, ``kernel`` wide, stride 1, zero padding (``avg``: divided by ``kernel`` like PyTorch's
  ``avg_pool1d``; ``max``);
* selection per KV head: the window plus the top ``budget - window`` prefix positions by the pooled score (ties:
  lower index first, like ONNX TopK), stored in ascending position order (the official code keeps top-k order;
  attention does not depend on it, keys carry their RoPE positions);
* positions: cached keys keep their original RoPE positions; new tokens continue at absolute positions and are
  cached after the compressed prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError

POOLS = ("avg", "max")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MethodSpecError(f"snapkv: {name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class SnapKV:
    """Compress the prompt's KV cache to ``budget`` positions per layer and KV head, chosen by the attention of the
    last ``window`` prompt positions (official defaults: budget 2048, window 32, kernel 5, average pooling)."""

    budget: int = 2048
    window: int = 32
    kernel: int = 5
    pool: str = "avg"
    name: ClassVar[str] = "snapkv"
    target: ClassVar[str] = "mllm"

    def __post_init__(self) -> None:
        for field_name in ("budget", "window", "kernel"):
            _positive_int(field_name, getattr(self, field_name))
        if self.kernel % 2 == 0:
            raise MethodSpecError(
                f"snapkv: kernel must be odd (the pooled score keeps the sequence length), got {self.kernel}"
            )
        if self.pool not in POOLS:
            raise MethodSpecError(f"snapkv: pool must be one of {POOLS}, got {self.pool!r}")
        if self.window >= self.budget:
            raise MethodSpecError(
                f"snapkv: window={self.window} must be smaller than budget={self.budget} (the budget holds the "
                "window plus the selected prefix positions)"
            )

    def kept_count(self, length: int) -> int:
        """Positions a ``length``-position prompt keeps per layer and KV head."""
        return min(self.budget, length)

    def validate(self, capacity: int) -> None:
        if self.budget >= capacity:
            raise MethodSpecError(
                f"snapkv: budget={self.budget} leaves no cache slot for new tokens in a {capacity}-slot decode graph; "
                f"use budget <= {capacity - 1} or a larger --capacity"
            )
        if self.budget > 3840:
            raise MethodSpecError(
                f"snapkv: budget={self.budget} needs a TopK over more than 3840 positions, which TensorRT rejects; "
                "use budget <= 3840"
            )

    def to_dict(self) -> dict[str, Any]:
        fields = {"budget": self.budget, "window": self.window, "kernel": self.kernel, "pool": self.pool}
        return {"name": self.name, **fields}

    def describe(self) -> str:
        return f"snapkv(budget={self.budget}, window={self.window}, kernel={self.kernel}, pool='{self.pool}')"
