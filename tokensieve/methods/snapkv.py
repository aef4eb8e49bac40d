"""SnapKV prompt-cache compression (NeurIPS 2024) at the end of an MLLM prefill: the method's single declaration.

Both faces read this dataclass: the eager reference (``tokensieve.reference.snapkv``) and the scoring step of the
prompt-cache pass (``tokensieve.graph_passes.prompt_cache`` on the prefill graph; the decode graphs are unchanged,
the runtime writes new tokens after the compressed prompt). Selection and positions:
:mod:`tokensieve.methods.prompt_cache`. Score (docs/methods.md#snapkv), per layer:

* the attention probabilities of the last ``window`` prompt positions (query rows, causal inside the window),
  summed over those rows, for the prefix columns (the window's columns score 0, the window is always kept);
* mean over the query heads of each KV group (kvpress's GQA rule: the official code stores a GQA-expanded cache and
  selects per query head, which would multiply the cache by ``heads / kv_heads``; both agree when
  ``heads == kv_heads``);
* a 1-D pooling over positions, ``kernel`` wide, stride 1, zero padding (``avg``: divided by ``kernel`` like
  PyTorch's ``avg_pool1d``; ``max``).

The official code keeps the selected positions in top-k order; here they are ascending (attention does not depend on
the order, keys carry their RoPE positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.decoder import PlanInput
from tokensieve.methods.prompt_cache import PromptCacheCompression, positive_int

POOLS = ("avg", "max")


@dataclass(frozen=True)
class SnapKV(PromptCacheCompression):
    """Compress the prompt's KV cache to ``budget`` positions per layer and KV head, chosen by the attention of the
    last ``window`` prompt positions (official defaults: budget 2048, window 32, kernel 5, average pooling)."""

    budget: int = 2048
    window: int = 32
    kernel: int = 5
    pool: str = "avg"
    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        positive_int(self.name, "window", self.window)
        positive_int(self.name, "kernel", self.kernel)
        if self.kernel % 2 == 0:
            raise MethodSpecError(
                f"snapkv: kernel must be odd (the pooled score keeps the sequence length), got {self.kernel}"
            )
        if self.pool not in POOLS:
            raise MethodSpecError(f"snapkv: pool must be one of {POOLS}, got {self.pool!r}")
        self.check_budget()

    @property
    def protected(self) -> int:
        return self.window

    def scoring_macs(self, p: PlanInput) -> int:  # the observation window's attention rows over the prompt
        return p.layers * min(self.window, p.length) * p.length * p.heads * p.head_dim

    def selection(self) -> str:
        return f"the prefix positions they attend to most ({self.pool}-pooled over {self.kernel})"

    def to_dict(self) -> dict[str, Any]:
        fields = {"budget": self.budget, "window": self.window, "kernel": self.kernel, "pool": self.pool}
        return {"name": self.name, **fields}

    def describe(self) -> str:
        return f"snapkv(budget={self.budget}, window={self.window}, kernel={self.kernel}, pool='{self.pool}')"
