"""What every MLLM decoder method declares: the protocol the export, parity, plan, inspect, bench and runtime code
dispatch through.

A decoder method is a frozen dataclass deriving from :class:`DecoderMethod`. Pure-Python faces live on the class:

* ``validate(ctx)``: a typed error when the method cannot fit the model described by a :class:`DecoderContext`;
* declarative facts the generic code reads (class attributes and properties below): which graphs the export
  produces (``growing_cache``, ``split_vision``, ``cls_scores``, ``host_cuts``), how the runtime feeds them
  (``cuts``, ``cache_cuts``, ``contiguous_positions``, ``final_cache``, ``ring``, ``evicts``, ``cached_prompt``,
  ``fixed_capacity``), what parity compares (``kept_fields``, ``kept_separated``, ``shortens_prompt``) and which
  graphs get symbolic axes and why (``dynamic``);
* ``plan(p)``: the cost arithmetic of :class:`PlanInput` (``None``: the counts depend on the data, ``data_dependent``);
* ``explain(decoder, image_tokens)``: what the method does to an exported artifact, in words (``tokensieve inspect``).

The faces that need numpy, onnx or torch register themselves per class (:mod:`tokensieve.methods.faces`): the
export rewrite (``"export"``, ``tokensieve.graph_passes``), the eager reference (``"reference"``,
``tokensieve.reference``) and the host decisions (``"prefill_cut"``, ``"image_tokens"``, ``"decoder"``,
``"bench_decoder"``, ``tokensieve.runtimes``). ``docs/adding-a-method.md`` walks through FastV.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

CUT_OUTPUT = "cut_positions_"  # + g: a prefill graph that cuts several times inside itself outputs each cut's rows
GROUP_OUTPUT = "group_positions_"  # + g: a prefill graph that decides every decode cache group outputs its positions


@dataclass(frozen=True)
class DecoderContext:
    """The model a decoder method is validated against."""

    layers: int  # decoder layers
    kind: str  # the family's model_type: "llava", "llava_next", "internvl" (for messages)
    select_strategy: str  # the vision feature strategy: "default" (CLS dropped) or "full"
    image_tokens: int  # image tokens of one image (plain LLaVA; 0 when it varies with the image size)
    capacity: int  # slots of the fixed-capacity decode graph
    # the image-token layout: "grid" (one square patch grid, LLaVA), "anyres" (LLaVA-NeXT's thumbnail + unpadded
    # crop grid with row newlines), "tiles" (InternVL's tiles + thumbnail, pixel-shuffled), "mrope" (Qwen-VL's
    # merged grid of any size with three-row positions)
    layout: str = "grid"


# what each image-token layout is, in the words of the refusals of methods that need another one
LAYOUT_WORDS = {
    "grid": "this model's image is one square tile (plain LLaVA)",
    "anyres": "LLaVA-NeXT packs a thumbnail and crops",
    "tiles": "InternVL packs tiles and a thumbnail, each tile's patch tokens pixel-shuffled (2x2 patches per token)",
    "mrope": "Qwen-VL's image is one merged patch grid of any size (2x2 patches per token), with (t, h, w) positions",
}


@dataclass(frozen=True)
class PlanInput:
    """A prompt on a decoder, for the cost arithmetic of :meth:`DecoderMethod.plan`."""

    layers: int
    heads: int
    head_dim: int
    image_tokens: int
    length: int  # prompt positions, image included
    new_tokens: int
    capacity: int  # the fixed decode graph's slots (evicting caches keep this many)
    kv_heads: int = 0  # KV heads per layer (0: as many as ``heads``)


@dataclass
class PlanCost:
    """What one generation costs with a method: the prefill tokens of every layer, the positions each layer caches
    at the end, the fixed decode graph's slots, the method's own scoring MACs in prefill, per-slot state, and, for
    methods whose KV heads cache different lengths, the head classes (KV heads of all layers, positions each holds
    at the end) and the slots of the classes the fixed decode graph gives cache tensors of their own (every other KV
    head has ``slots``; ``tokensieve plan``'s cache MiB is what the graph allocates)."""

    tokens: list[int]
    cached: list[int]
    slots: int
    scoring: int = 0
    unbounded: bool = False  # any number of new tokens fits the slots (eviction)
    state_bytes: int = 0  # per slot, layer and KV head, besides the keys and values
    classes: dict[str, tuple[int, int]] = field(default_factory=dict)  # head class -> (KV heads, positions held)
    class_slots: dict[str, int] = field(default_factory=dict)  # head class -> its own cache tensors' slots

    @classmethod
    def unreduced(cls, p: PlanInput) -> PlanCost:
        total = p.length + p.new_tokens
        return cls([p.length] * p.layers, [total] * p.layers, total)


class DecoderMethod:
    """Base of every MLLM decoder method (see the module docstring)."""

    name: ClassVar[str]
    target: ClassVar[str] = "mllm"
    growing_cache: ClassVar[bool] = True  # the export can add the growing-cache decode graph
    split_vision: ClassVar[bool] = False  # the vision graph is split (vision_0 / vision_1) with host work between
    cls_scores: ClassVar[bool] = False  # the vision graph also outputs the CLS attention scores (cls_scores)
    host_cuts: ClassVar[bool] = False  # prefill runs as segments prefill_0..n with host decisions between them
    contiguous_positions: ClassVar[bool] = False  # layers after a cut see contiguous position ids
    final_cache: ClassVar[bool] = False  # after prefill, layers from cache_cuts[0] on cache only the final positions
    ring: ClassVar[bool] = False  # the fixed cache is a ring: the method has slot(position, capacity), retained()
    evicts: ClassVar[bool] = False  # any context fits the cache (no capacity check)
    data_dependent: ClassVar[bool] = True  # kept counts depend on the image / prompt: no plan, bench measures
    shortens_prompt: ClassVar[bool] = False  # the image run is shortened before prefill (the prompt ids change)
    kept_fields: ClassVar[tuple[str, ...]] = ("kept_positions",)  # result fields parity compares, concatenated
    kept_separated: ClassVar[bool] = False  # each part of the kept fields ended by -1 (parts of different kinds)
    several_images: ClassVar[bool] = False  # a prompt may hold several images (the method reads no single image run)

    @property
    def cuts(self) -> tuple[int, ...]:
        """The decoder layers the prefill is cut before (ascending; empty: no cut)."""
        return ()

    @property
    def cache_cuts(self) -> tuple[int, ...]:
        """The decoder layers the decode graphs split their cache slot at (one slot input per cut)."""
        return ()

    def validate(self, ctx: DecoderContext) -> None:
        """A :class:`tokensieve.errors.MethodSpecError` when the method cannot fit ``ctx``."""

    def fixed_capacity(self) -> int | None:
        """The fixed decode graph's slots the method needs whatever the source (``None``: the source's default)."""
        return None

    def cached_prompt(self, length: int) -> int:
        """Positions a ``length``-position prompt leaves in the cache after prefill."""
        return length

    def host_inputs(self, image_tokens: int) -> dict[str, list]:
        """Extra prefill-graph inputs the host feeds for an image of ``image_tokens`` tokens (name -> float32
        values, nested lists for more axes; SparseVLM's seeded density noise): randomness a TensorRT engine cannot
        seed itself."""
        return {}

    def vision_windows(self, image_tokens: int) -> list[list[int]] | None:
        """Windows the split vision graph scores (``None``: none)."""
        return None

    def dynamic(self, graphs: Iterable[str]) -> dict[str, str]:
        """Graphs (among ``graphs``) whose symbolic axes the method adds or changes, and why."""
        return {}

    def plan(self, p: PlanInput) -> PlanCost | None:
        """The cost of one generation (``None`` when ``data_dependent``)."""
        return None

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str | None:
        """What the method does to the sequence or the cache, in words, given the manifest's decoder geometry and image
        token facts."""
        return None
