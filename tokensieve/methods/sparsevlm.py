"""SparseVLM text-guided visual-token sparsification in an MLLM decoder (ICML 2025): the method's single declaration.

Semantics of the official code (Gumpest/SparseVLMs, Apache-2.0: read, not copied): docs/methods.md#sparsevlm. Both
faces read this dataclass: the eager reference (``tokensieve.reference.sparsevlm``) and the graph pass
(``tokensieve.graph_passes.sparsevlm``: every cut inside the one prefill graph; the decode graphs' later layers on
their own cache slot, and with contiguous positions on their own position, per cut).

* raters, once, on the LLM input embeddings: ``m = mean over image tokens of softmax over the text after the image
  of (image · textᵀ)``; the raters are the text positions after the image with ``m > mean(m)`` (a data-dependent
  count, a 0/1 mask over the sequence in the graph);
* after each pruning layer ``l`` of ``layers`` (scored with layer ``l``'s own post-softmax attention, head mean,
  rows = the raters, mean over them, columns = the image tokens present): the top ``K = min(budget, N - 1)`` image
  tokens stay, in ascending order (ties: lower index first);
* version 1 recycles: the pruned tokens of highest score, ``S = int(0.3 * pruned) + 1`` of them, are clustered with
  DPC-kNN into ``C = int(S / 10) + 1`` tokens (a density noise of ``1e-6 * uniform`` the host feeds, seeded), which
  are inserted after the kept image tokens and count as image tokens at the later cuts; version 2 does not;
* positions: version 1 re-indexes the sequence after a cut ``0..T'-1`` (and decodes every layer at its own cache
  length), version 2 keeps the original position ids (and decodes at the absolute position);
* budgets: ``budgets=[...]`` per pruning layer, or the official table of ``retain`` (kept after layers 2, 6, 15 of
  LLaVA-1.5-7B), which needs three pruning layers.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from tokensieve.errors import MethodSpecError
from tokensieve.methods.base import check_layers
from tokensieve.methods.decoder import DecoderContext, DecoderMethod, PlanCost, PlanInput

TABLES = {  # official kept counts after layers 2, 6, 15 per retain setting (version 1, version 2)
    1: {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    2: {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
POSITIONS = ("contiguous", "original")
NOISE_SCALE = 1e-6
NOISE_INPUT = "density_noise"


@dataclass(frozen=True)
class Stage:
    """The counts at one cut: image tokens present, kept, recycled (clustered) and cluster tokens made."""

    image: int
    kept: int
    recycled: int
    clusters: int

    @property
    def after(self) -> int:
        """Image tokens after the cut (kept + cluster tokens)."""
        return self.kept + self.clusters


@dataclass(frozen=True)
class SparseVLM(DecoderMethod):
    """Keep the image tokens the text raters attend to most after each of ``layers``; recycle the pruned (v1)."""

    layers: tuple[int, ...] = (2, 6, 15)
    retain: int = 192
    budgets: tuple[int, ...] | None = None
    version: int = 1
    positions: str | None = None
    seed: int = 0
    name: ClassVar[str] = "sparsevlm"
    data_dependent: ClassVar[bool] = False
    kept_fields: ClassVar[tuple[str, ...]] = ("cut_positions",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", check_layers(self.name, self.layers))
        if self.version not in TABLES:
            raise MethodSpecError(f"sparsevlm: version must be 1 (recycling) or 2 (no recycling), got {self.version!r}")
        positions = self.positions or POSITIONS[self.version - 1]
        if positions not in POSITIONS:
            raise MethodSpecError(f"sparsevlm: positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.version == 1 and positions == "original":
            raise MethodSpecError(
                "sparsevlm: version 1's recycled cluster tokens have no original position; use positions='contiguous' "
                "or version=2"
            )
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "budgets", self._budgets())
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MethodSpecError(f"sparsevlm: seed must be an integer, got {self.seed!r}")

    def _budgets(self) -> tuple[int, ...]:
        if self.budgets is None:
            table = TABLES[self.version]
            if self.retain not in table:
                raise MethodSpecError(
                    f"sparsevlm: retain must be one of {sorted(table)} (the official tables), got {self.retain!r}; "
                    "or give budgets=[...] per pruning layer"
                )
            if len(self.layers) != 3:
                raise MethodSpecError(
                    "sparsevlm: the official budget table has 3 entries (layers 2, 6, 15) but "
                    f"layers={list(self.layers)}; give budgets=[...] with one kept count per pruning layer"
                )
            return table[self.retain]
        budgets = list(self.budgets) if isinstance(self.budgets, (list, tuple)) else [self.budgets]
        if len(budgets) != len(self.layers) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in budgets
        ):
            raise MethodSpecError(
                f"sparsevlm: budgets must list one image-token count >= 0 per pruning layer ({len(self.layers)}), "
                f"got {self.budgets!r}"
            )
        return tuple(budgets)

    @property
    def recycle(self) -> bool:
        return self.version == 1

    @property
    def contiguous_positions(self) -> bool:  # type: ignore[override]
        return self.positions == "contiguous"

    @property
    def cuts(self) -> tuple[int, ...]:
        """The prefill is cut after each pruning layer ``l`` (before ``l + 1``), scored with layer ``l``."""
        return tuple(layer + 1 for layer in self.layers)

    @property
    def cache_cuts(self) -> tuple[int, ...]:
        return self.cuts

    def stages(self, image_tokens: int) -> list[Stage]:
        """The counts at every cut for an image of ``image_tokens`` tokens (integer forms of the official
        ``min(budget, N - 1)``, ``int(0.3 * pruned) + 1`` and ``int(S / 10) + 1``; nothing without an image)."""
        out, present = [], image_tokens
        for budget in self.budgets:
            kept = max(min(budget, present - 1), 0)
            pruned = present - kept
            recycled = (3 * pruned) // 10 + min(pruned, 1) if self.recycle else 0
            clusters = recycled // 10 + min(recycled, 1)
            out.append(Stage(present, kept, recycled, clusters))
            present = kept + clusters
        return out

    def density_noise(self, cut: int, count: int) -> list[float]:
        """The DPC-kNN density noise of cut ``cut``: its first ``count`` values in ``[0, 1e-6)``, seeded by ``seed``
        and the cut (the host feeds them to the graph, the reference adds the same ones)."""
        rng = random.Random(f"sparsevlm/{self.seed}/{cut}")
        return [rng.random() * NOISE_SCALE for _ in range(count)]

    def host_inputs(self, image_tokens: int) -> dict[str, list[list[float]]]:
        """Version 1: ``density_noise [cuts, image_tokens]``, each cut's noise (a cut recycles at most as many tokens
        as the image has; it reads the first ones)."""
        if not self.recycle:
            return {}
        return {NOISE_INPUT: [self.density_noise(g, image_tokens) for g in range(len(self.layers))]}

    def check_range(self, layers: int) -> None:
        if self.layers[-1] + 1 >= layers:
            raise MethodSpecError(
                f"sparsevlm: pruning layer {self.layers[-1]} is out of range; this decoder has {layers} layers and a "
                f"pruning layer needs a layer after it (0..{layers - 2})"
            )

    def validate(self, ctx: DecoderContext) -> None:
        self.check_range(ctx.layers)

    def dynamic(self, graphs: Iterable[str]) -> dict[str, str]:
        notes = {"prefill": "sequence and image_tokens (SparseVLM: every cut's length is an expression of both)"}
        if self.recycle:
            notes["prefill"] += "; density_noise [cuts, image_tokens]: each cut's DPC-kNN density noise"
        return notes

    def lengths(self, length: int, image_tokens: int) -> list[int]:
        """The sequence before the first cut and after each cut."""
        out = [length]
        for stage in self.stages(image_tokens):
            out.append(out[-1] - stage.image + stage.after)
        return out

    def plan(self, p: PlanInput) -> PlanCost:
        self.check_range(p.layers)
        lengths, hidden = self.lengths(p.length, p.image_tokens), p.heads * p.head_dim
        bounds = [0, *self.cuts, p.layers]
        tokens = [lengths[g] for g in range(len(bounds) - 1) for _ in range(bounds[g], bounds[g + 1])]
        scoring = p.image_tokens * p.length * hidden  # the raters: image · textᵀ on the input embeddings
        for stage, length in zip(self.stages(p.image_tokens), lengths, strict=False):
            scoring += length * length + stage.clusters * stage.recycled * hidden  # rater rows, cluster means
        return PlanCost(tokens, [t + p.new_tokens for t in tokens], p.length + p.new_tokens, scoring)

    def explain(self, decoder: dict[str, Any], image_tokens: dict[str, Any]) -> str:
        count = image_tokens.get("count")
        made = " + the DPC-kNN cluster tokens of the pruned ones" if self.recycle else ""
        kept = (
            f"{[s.after for s in self.stages(count)]} of {count} image tokens"
            if count
            else f"min(budget, N - 1){made} of the N image tokens present, budgets {list(self.budgets)}"
        )
        return (
            f"after layers {list(self.layers)} the image tokens the text raters attend to most stay ({kept}), "
            f"every text token stays; later layers at {self.positions} positions and their own cache length"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layers": list(self.layers),
            "retain": self.retain,
            "budgets": list(self.budgets),
            "version": self.version,
            "positions": self.positions,
            "seed": self.seed,
        }

    def describe(self) -> str:
        return (
            f"sparsevlm(layers={list(self.layers)}, budgets={list(self.budgets)}, version={self.version}, "
            f"positions={self.positions!r}, seed={self.seed})"
        )
