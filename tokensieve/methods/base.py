"""What every ViT token-reduction method declares, and the schedule of several methods in one model.

A method is a small frozen dataclass with:

* ``name`` and ``merges`` (whether it produces token sizes, which turn on proportional attention and size-weighted
  pooling downstream);
* ``layers_for(depth)``: the blocks it owns (two methods may not own the same block);
* ``validate(tokens, specials, depth)``: a typed error when the method cannot fit the model;
* ``site(layer, tokens_in, specials, depth)``: the token counts at one of its blocks (``None`` when it does nothing
  there, e.g. ToMe with ``r = 0``);
* ``to_dict()`` / ``describe()`` for manifests and messages.

Counts live here and only here: the eager reference and the graph pass both read :class:`SiteCount`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, Literal, Protocol

from tokensieve.errors import MethodSpecError
from tokensieve.methods.decoder import DecoderMethod


@dataclass(frozen=True)
class SiteCount:
    """Token counts at one reduction site. ``candidates`` = non-special tokens entering the site."""

    layer: int
    tokens_in: int
    candidates: int
    tokens_out: int
    params: dict[str, int] = field(default_factory=dict)


class Method(Protocol):
    name: str
    merges: bool

    def layers_for(self, depth: int) -> tuple[int, ...]: ...

    def validate(self, tokens: int, specials: int, depth: int) -> None: ...

    def site(self, layer: int, tokens_in: int, specials: int, depth: int) -> SiteCount | None: ...

    def to_dict(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


Score = Literal["auto", "cls", "mean_received"]


def check_score(name: str, score: Any) -> None:
    if score not in ("auto", "cls", "mean_received"):
        raise MethodSpecError(f"{name}: score must be 'auto', 'cls' or 'mean_received', got {score!r}")


def resolve_score(name: str, score: Score, specials: int) -> Literal["cls", "mean_received"]:
    """The attention score a method ranks tokens by on a model with ``specials`` leading special tokens: ``auto``
    is the CLS query row when there is a leading special token, else the attention each token receives averaged
    over every query row and head (the usual CLS-free importance)."""
    if score == "auto":
        return "cls" if specials >= 1 else "mean_received"
    if score == "cls" and specials < 1:
        raise MethodSpecError(f"{name}: score='cls' needs a CLS token, but this model has none; use score='auto'")
    return score


def check_layers(name: str, layers: Sequence[int] | int | None) -> tuple[int, ...] | None:
    """Validate a ``layers`` argument: ``None`` (all blocks) or non-negative, distinct block indices (sorted)."""
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise MethodSpecError(f"{name}: layers must be a non-empty list of block indices, got {layers!r}")
    if any(i < 0 for i in layers):
        raise MethodSpecError(f"{name}: layer indices are 0-based and non-negative, got {list(layers)}")
    if len(set(layers)) != len(layers):
        raise MethodSpecError(f"{name}: layers {list(layers)} contain duplicates")
    return tuple(sorted(layers))


def check_depth(name: str, layers: tuple[int, ...], depth: int) -> None:
    if layers and layers[-1] >= depth:
        raise MethodSpecError(
            f"{name}: layer {layers[-1]} is out of range; this model has {depth} blocks (0..{depth - 1})"
        )


def check_bool(name: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise MethodSpecError(f"{name}: {key} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class Schedule:
    """Tokens entering every block and the sites, in block order, for a list of methods."""

    entering: list[int]
    sites: list[tuple[Method, SiteCount]]

    @property
    def merges(self) -> bool:
        return any(m.merges for m, _ in self.sites)


def check_target(methods: Sequence[Method], target: str) -> None:
    """A :class:`MethodSpecError` unless every method applies to ``target``: ``"vit"`` (blocks of an image model) or
    ``"mllm"`` (an MLLM decoder)."""
    wrong = [m.describe() for m in methods if getattr(m, "target", "vit") != target]
    if wrong and target == "mllm":
        raise MethodSpecError(
            f"{', '.join(wrong)} reduces ViT blocks; an MLLM export takes decoder methods such as "
            "'fastv(k=2, keep=0.5)'"
        )
    if wrong:
        raise MethodSpecError(
            f"{', '.join(wrong)} works on an MLLM decoder; export an MLLM source (hf:llava-tiny, "
            "hf:llava-next-tiny, a LLaVA checkpoint) with it"
        )


def schedule(methods: Sequence[Method], tokens: int, specials: int, depth: int) -> Schedule:
    """Validate ``methods`` together and compute the token schedule of a ``depth``-block model."""
    check_target(methods, "vit")
    owners: dict[int, Method] = {}
    for method in methods:
        method.validate(tokens, specials, depth)
        for layer in method.layers_for(depth):
            if layer in owners:
                raise MethodSpecError(
                    f"block {layer} is claimed by both {owners[layer].name} and {method.name}; give the methods "
                    "disjoint layers"
                )
            owners[layer] = method
    entering: list[int] = []
    sites: list[tuple[Method, SiteCount]] = []
    n = tokens
    for layer in range(depth):
        entering.append(n)
        method = owners.get(layer)
        count = method.site(layer, n, specials, depth) if method is not None else None
        if count is not None:
            sites.append((method, count))
            n = count.tokens_out
    return Schedule(entering, sites)


def for_layout(methods: Sequence[Method], specials: int) -> list[Method]:
    """The methods with the choices they leave to the located model made, through a method's optional
    ``for_layout(specials)`` (ATP's ``score="auto"``): what the artifact records and both faces read."""
    return [m.for_layout(specials) if hasattr(m, "for_layout") else m for m in methods]


def check_keep(name: str, keep: Any, example: str = "keep=0.7 keeps 70 %", argument: str = "keep") -> Fraction:
    """A keep fraction in (0, 1] as an exact :class:`Fraction` (a float is read from its decimal text)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, Fraction, float)):
        raise MethodSpecError(f"{name}: {argument} must be a number in (0, 1], got {keep!r}")
    keep = Fraction(str(keep)) if isinstance(keep, float) else Fraction(keep)
    if not 0 < keep <= 1:
        shown = f"{float(keep):g}" if abs(keep) < 10**300 else "a number beyond 1e300"
        raise MethodSpecError(f"{name}: {argument} must be in (0, 1], got {shown}; e.g. {example}")
    return keep


def ceil_fraction(keep: Fraction, count: int) -> int:
    """``ceil(keep * count)`` in exact integer arithmetic."""
    return (keep.numerator * count + keep.denominator - 1) // keep.denominator


def spatial_grid(name: str, grid: float, tokens: int, what: str) -> list[int]:
    """ATP's spatial grid (SAP): indices of every ``stride``-th row and column of a square grid of ``tokens``,
    ``stride = round(sqrt(1 / grid))`` (``grid`` = the fraction kept; 0: none)."""
    if not grid or not tokens:
        return []
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise MethodSpecError(
            f"{name}: the spatial grid needs a square grid of {what}, but there are {tokens}; use grid=0"
        )
    stride = max(1, round(math.sqrt(1 / grid)))
    return [r * side + c for r in range(0, side, stride) for c in range(0, side, stride)]


def check_cuts(name: str, layers: Any, example: str) -> tuple[int, ...]:
    """Decoder layers a prefill is cut before (each >= 1: layer ``k - 1`` scores the cut before ``k``), sorted."""
    cuts = check_layers(name, layers)
    if not cuts or cuts[0] < 1:
        raise MethodSpecError(
            f"{name}: layers must list decoder layers >= 1 to cut before (layer k-1 scores the cut before layer k), "
            f"e.g. {example}; got {layers!r}"
        )
    return cuts


def check_cut_range(name: str, cuts: tuple[int, ...], layers: int) -> None:
    if cuts[-1] >= layers:
        raise MethodSpecError(
            f"{name}: layer {cuts[-1]} is out of range; this decoder has {layers} layers, so a cut must be before a "
            f"layer in 1..{layers - 1}"
        )


def check_real(name: str, key: str, value: Any) -> float | None:
    """A finite number (``None`` passes through) as a float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)) or not math.isfinite(value):
        raise MethodSpecError(f"{name}: {key} must be a finite number, got {value!r}")
    return float(value)


class PrefillCuts(DecoderMethod):
    """Base of the MLLM methods that cut the prefill before decoder ``layers`` and decide on the host between the
    segments (ATP-LLaVA, DyVTE, MustDrop): the cut list's checks and the ``cuts`` the export and the runtime read
    (MustDrop's ``cache_cuts`` differ from its ``cuts``)."""

    name: ClassVar[str]
    layers: tuple[int, ...]
    host_cuts: ClassVar[bool] = True
    kept_fields: ClassVar[tuple[str, ...]] = ("cut_positions",)  # every cut's positions, one after the other

    def check_layers(self, example: str) -> None:
        object.__setattr__(self, "layers", check_cuts(self.name, self.layers, example))

    @property
    def cuts(self) -> tuple[int, ...]:
        """The decoder layers the prefill is cut before (ascending)."""
        return self.layers

    @property
    def cache_cuts(self) -> tuple[int, ...]:
        """The decoder layers the decode graphs split their cache slot at (one group per cut)."""
        return self.cuts

    def check_range(self, layers: int) -> None:
        check_cut_range(self.name, self.layers, layers)

    def dynamic(self, graphs: Iterable[str]) -> dict[str, str]:
        segments = {
            key: "sequence (the positions kept so far) and image_tokens" for key in graphs if key[:8] == "prefill_"
        }
        return {**segments, f"prefill_{len(self.cuts)}": "sequence (the positions the last cut keeps)"}
