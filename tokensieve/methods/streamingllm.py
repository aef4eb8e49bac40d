"""StreamingLLM KV-cache eviction (attention sinks + a recent window) in the fixed-capacity decode graph.

Both faces read this dataclass: the eager reference (``tokensieve.reference.streamingllm``) and the graph face
(``tokensieve.graph_passes.cache_visibility`` on the decode graph, plus the slot policy below, which the runtime
applies). Semantics (docs/methods.md#streamingllm, with the position rule of kvpress / H2O):

* the cache holds at most ``capacity`` positions: the first ``sink`` positions of the sequence (attention sinks)
  and the most recent ``capacity - sink``;
* keys are cached after RoPE at their **original** positions and new tokens continue at absolute positions (the
  official code's ``pos_shift`` re-rotates cached keys to slot positions every step; not done here);
* prefill runs over the whole prompt; what exceeds the budget is evicted after it;
* the fixed cache is a ring: position ``p`` lives in slot ``p`` while ``p < capacity``, afterwards in slot
  ``sink + (p - sink) mod (capacity - sink)``, overwriting the oldest non-sink position. Attention order does not
  matter (keys carry their positions), so the ring needs no shifting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.decoder import DecoderContext, DecoderMethod, PlanCost, PlanInput


@dataclass(frozen=True)
class StreamingLLM(DecoderMethod):
    """Keep ``sink`` attention-sink positions and the most recent ones within the cache capacity."""

    sink: int = 4
    several_images: ClassVar[bool] = True
    name: ClassVar[str] = "streamingllm"
    ring: ClassVar[bool] = True
    evicts: ClassVar[bool] = True
    data_dependent: ClassVar[bool] = False
    kept_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise MethodSpecError(f"streamingllm: sink must be a number of positions >= 0, got {self.sink!r}")

    def check_capacity(self, capacity: int) -> None:
        if self.sink > capacity - 2:
            raise MethodSpecError(
                f"streamingllm: sink={self.sink} leaves no recent window in a {capacity}-slot cache; use sink <= "
                f"{capacity - 2} or a larger --capacity"
            )

    def validate(self, ctx: DecoderContext) -> None:
        self.check_capacity(ctx.capacity)

    def plan(self, p: PlanInput) -> PlanCost:
        self.check_capacity(p.capacity)
        cached = [min(p.length + p.new_tokens, p.capacity)] * p.layers
        return PlanCost([p.length] * p.layers, cached, p.capacity, unbounded=True)

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        capacity = decoder["capacity"]
        return (
            f"the cache keeps the first {self.sink} positions (attention sinks) and the latest {capacity - self.sink}; "
            "the fixed decode graph is a ring (slot and visible slots from the host)"
        )

    def slot(self, position: int, capacity: int) -> int:
        """The cache slot of sequence position ``position``."""
        if position < capacity:
            return position
        return self.sink + (position - self.sink) % (capacity - self.sink)

    def retained(self, length: int, capacity: int) -> list[int]:
        """Positions ``0..length-1`` that are cached once ``length`` positions were seen (ascending)."""
        if length <= capacity:
            return list(range(length))
        return [*range(self.sink), *range(length - (capacity - self.sink), length)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sink": self.sink}

    def describe(self) -> str:
        return f"streamingllm(sink={self.sink})"
