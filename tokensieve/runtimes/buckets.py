"""Bucket dispatch for staged (adaptive) artifacts: run stage 1, route every image to the smallest bucket that holds
its token count, run the bucket's stage graph, and reassemble the batch in order.

Modes:

* ``bucketed``: static-shape stage graphs, one per bucket (what TensorRT, Jetson and DLA run). A batch with mixed
  counts is split into per-bucket groups. A count above the largest bucket raises :class:`BucketOverflowError`,
  or, with ``allow_truncation``, runs in the largest bucket keeping its highest-priority tokens (reported per image);
* ``oracle``: the symbolic-K stage graphs at exactly each image's count (the dynamic-shape reference; one group per
  distinct count);
* ``padmax``: the single graph that pads every image to the maximum count and masks the padding.

Outputs whose shapes agree across groups are stacked; token-level outputs (``last_hidden_state``) come back as a
list of per-image arrays holding only the valid tokens (special tokens + kept tokens, in order). With ``expose``
the kept positions of every site (debug outputs of the stage graphs) are collected per image in ``.exposed``.

The stage graphs run on ONNX Runtime by default; ``runner_factory(relative path, extra outputs)`` substitutes any
object with ``input_names`` and ``run(feeds) -> dict`` (the Triton router calls its stage models through Triton this
way). Only numpy is imported here, so the dispatcher also runs where onnx and torch are not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tokensieve.errors import RuntimeBackendError
from tokensieve.manifest import WEIGHTS
from tokensieve.runtimes.pixels import check_pixels

MODES = ("bucketed", "oracle", "padmax")


class StageRunner(Protocol):
    """What the dispatcher needs of a stage graph's runner (:class:`tokensieve.runtimes.ort.OrtRunner` is one)."""

    input_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


RunnerFactory = Callable[[str, Sequence[str]], StageRunner]


class BucketOverflowError(RuntimeBackendError):
    """An image keeps more tokens than the largest bucket holds (and truncation is not allowed)."""


@dataclass
class Route:
    """How one image went through the stages: its kept count and bucket at every site."""

    counts: list[int] = field(default_factory=list)
    buckets: list[int] = field(default_factory=list)
    truncated: bool = False


@dataclass
class StagedResult:
    outputs: dict[str, np.ndarray | list[np.ndarray]]
    routes: list[Route]

    def packed(self, specials: int, slots: int) -> dict[str, np.ndarray]:
        """Every output as one array: token-level outputs zero-padded to ``specials + slots`` tokens per image (the
        largest last bucket, so the shape is static), plus ``kept_tokens`` and ``buckets`` ([batch, sites] int64:
        the tokens each site kept for each image, after truncation, and the bucket it ran in)."""
        out: dict[str, np.ndarray] = {}
        for name, value in self.outputs.items():
            if isinstance(value, list):
                padded = np.zeros((len(value), specials + slots, *value[0].shape[1:]), value[0].dtype)
                for i, part in enumerate(value):
                    padded[i, : len(part)] = part
                value = padded
            out[name] = value
        out["kept_tokens"] = np.array(
            [[min(c, b) for c, b in zip(r.counts, r.buckets, strict=True)] for r in self.routes], np.int64
        )
        out["buckets"] = np.array([r.buckets for r in self.routes], np.int64)
        return out


def without_debug(out: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stage graph's outputs without its debug outputs (``tokensieve/...``): the state the next stage takes."""
    return {k: v for k, v in out.items() if not k.startswith("tokensieve/")}


def bucket_feeds(state: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The inputs of a stage graph with ``size`` slots, from the previous stage's ``state`` (stream, priority key,
    count, and the original positions of the stream's tokens where later blocks read position tables or biases):
    the slots beyond each image's count are marked invalid."""
    feeds = {
        "tokens": state["stream"],
        "order_key": state["priority"],
        "valid": np.arange(size)[None, :] < state["count"].astype(np.int64)[:, None],
    }
    if "original_positions" in state:
        feeds["positions"] = state["original_positions"]
    return feeds


def pick_bucket(count: int, buckets: list[int], allow_truncation: bool) -> tuple[int, bool]:
    """The smallest bucket holding ``count`` tokens; (largest bucket, truncated) if none does and that is allowed."""
    for size in buckets:
        if count <= size:
            return size, False
    if not allow_truncation:
        raise BucketOverflowError(
            f"an image keeps {count} tokens but the largest bucket holds {buckets[-1]}; re-calibrate the buckets "
            "on data like this, add a larger bucket, or allow truncation (--allow-truncation)"
        )
    return buckets[-1], True


class StagedRunner:
    """Run a staged artifact's graphs (``stages`` is the manifest's ``stages`` entry) with ONNX Runtime
    (``runner_options``) or the runners ``runner_factory`` makes."""

    def __init__(
        self,
        directory: str | Path,
        stages: Mapping[str, Any],
        mode: str = "bucketed",
        allow_truncation: bool | None = None,
        expose: bool = False,
        runner_factory: RunnerFactory | None = None,
        **runner_options,
    ):
        if mode not in MODES:
            raise RuntimeBackendError(f"unknown staged mode {mode!r}; choose one of {', '.join(MODES)}")
        self.directory, self.stages, self.mode = Path(directory), stages, mode
        self.allow_truncation = stages.get("allow_truncation", False) if allow_truncation is None else allow_truncation
        self.options = dict(runner_options)
        self.factory = runner_factory or self._ort_runner
        self._runners: dict[str, StageRunner] = {}
        self.expose = expose
        self.exposed: dict[int, dict[str, np.ndarray]] = {}
        self.sites = len(stages["sites"])
        self.specials = int(stages["specials"])

    def _ort_runner(self, relative: str, extra: Sequence[str]) -> StageRunner:
        from tokensieve.runtimes.ort import OrtRunner, SharedWeights

        weights = self.directory / WEIGHTS
        if "weights" not in self.options and weights.is_file():  # every stage graph reads one copy of the weights
            self.options["weights"] = SharedWeights(weights)
        return OrtRunner(self.directory / relative, extra_outputs=extra, **self.options)

    def runner(self, relative: str, extra: Sequence[str] | None = None) -> StageRunner:
        """The runner of one stage graph; with ``expose``, its kept positions come back as extra outputs."""
        if relative not in self._runners:
            if extra is None:
                extra = list(self.stages.get("exposed", {}).get(relative, [])) if self.expose else []
            self._runners[relative] = self.factory(relative, extra)
        return self._runners[relative]

    def run(self, pixels: np.ndarray) -> StagedResult:
        check_pixels(pixels)
        if self.mode == "padmax":
            return self._run_padmax(pixels)
        return self.continue_from(self.first_stage(pixels))

    def _run_padmax(self, pixels: np.ndarray) -> StagedResult:
        counts = [f"tokensieve/site{layer}/count" for layer in self.stages["sites"]]
        runner = self.runner(self.stages["padmax"], extra=counts)
        out = runner.run({runner.input_names[0]: pixels})
        slots = self.stages["tokens"] - self.specials
        # the counts are debug outputs, which an engine does not have: there every slot is reported as kept
        kept = np.stack([out.pop(name, np.full(len(pixels), slots)).astype(np.int64) for name in counts], axis=1)
        routes = [Route(counts=[int(c) for c in row], buckets=[slots] * len(row)) for row in kept]
        return self._assemble({i: {k: v[i] for k, v in out.items()} for i in range(len(pixels))}, routes)

    def first_stage(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Stage 1: ``stream``, ``priority`` (order key) and ``count`` at the first decision site."""
        first = self.runner(self.stages["graphs"][""])
        return without_debug(first.run({first.input_names[0]: pixels}))

    def continue_from(self, state: dict[str, np.ndarray]) -> StagedResult:
        """Route and run the rest of the chain from stage 1's outputs (which a test may have edited)."""
        images = len(state["count"])
        routes = [Route() for _ in range(images)]
        self.exposed = {}
        collected: dict[int, dict[str, np.ndarray]] = {}
        self._advance(0, "", np.arange(images), state, routes, collected)
        return self._assemble(collected, routes)

    def _assemble(self, collected: dict[int, dict[str, np.ndarray]], routes: list[Route]) -> StagedResult:
        images = len(routes)
        outputs: dict[str, np.ndarray | list[np.ndarray]] = {}
        slots = [self.specials + r.buckets[-1] for r in routes]
        recorded = self.stages.get("token_outputs")  # artifacts before it: token-level when the size says so
        for name in collected[0]:
            parts = [collected[i][name] for i in range(images)]
            if recorded is not None:
                token_level = name in recorded
            else:
                token_level = all(p.ndim and p.shape[0] == n for p, n in zip(parts, slots, strict=True))
            if token_level:
                # token-level output: keep each image's valid tokens (specials + its kept tokens)
                valid = [self.specials + min(r.counts[-1], r.buckets[-1]) for r in routes]
                outputs[name] = [p[:n] for p, n in zip(parts, valid, strict=True)]
            else:
                outputs[name] = np.stack(parts)
        return StagedResult(outputs, routes)

    def _advance(
        self,
        site: int,
        path: str,
        samples: np.ndarray,
        state: dict[str, np.ndarray],
        routes: list[Route],
        collected: dict[int, dict[str, np.ndarray]],
    ) -> None:
        counts = state["count"].astype(np.int64)
        chosen = []
        for i, count in zip(samples, counts, strict=True):
            if self.mode == "oracle":
                size, truncated = int(count), False
            else:
                size, truncated = pick_bucket(int(count), self.stages["buckets"][path], self.allow_truncation)
            routes[i].counts.append(int(count))
            routes[i].buckets.append(size)
            routes[i].truncated |= truncated
            chosen.append(size)
        chosen = np.asarray(chosen)
        for size in np.unique(chosen):
            group = np.nonzero(chosen == size)[0]
            step = "*" if self.mode == "oracle" else str(size)
            key = f"{path}/{step}" if path else step
            graphs = self.stages["dynamic"] if self.mode == "oracle" else self.stages["graphs"]
            if key not in graphs:
                raise RuntimeBackendError(f"the artifact has no stage graph for buckets {key!r}")
            runner = self.runner(graphs[key])
            out = runner.run(bucket_feeds({k: v[group] for k, v in state.items()}, int(size)))
            for name in [n for n in out if n.startswith("tokensieve/")]:  # debug outputs: kept positions per site
                for j, i in enumerate(samples[group]):
                    self.exposed.setdefault(int(i), {})[name] = out[name][j]
            out = without_debug(out)
            if site + 1 < self.sites:
                self._advance(site + 1, key, samples[group], out, routes, collected)
            else:
                for j, i in enumerate(samples[group]):
                    collected[int(i)] = {name: value[j] for name, value in out.items()}
