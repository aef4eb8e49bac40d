"""Realistic inputs for the engine checks of a Jetson bundle.

* MLLM graphs take index inputs (cache write slots, image positions, kept positions) that must lie inside their
  tensors: trtexec's random inputs (INT64 in [-128, 127]) would make ScatterND / Gather read and write out of range.
  :func:`sample_feeds` runs one real generation (an image and a prompt) on ONNX Runtime and records the first feeds
  of every graph, which ``check.sh`` hands to trtexec (``--loadInputs``) at exactly those shapes.
* A DLA engine takes a fixed batch; :func:`golden_at_batch` rewrites the golden inputs and eager outputs as
  iterations of that batch for ``polygraphy run``, which feeds each recorded iteration as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.errors import CapacityError

SAMPLE_PROMPTS = (
    "Describe everything you can see in this picture: the objects, their colours and shapes, where they are, what "
    "the people or animals in it are doing, and what might happen next. Answer in a few full sentences.",
    "Describe the picture.",
)


class _RecordingBinding:
    """An ONNX Runtime IOBinding that remembers what is bound to each input."""

    def __init__(self, binding):
        self.binding, self.inputs = binding, {}

    def bind_cpu_input(self, name: str, value: np.ndarray) -> None:
        self.inputs[name] = np.array(value, copy=True)
        self.binding.bind_cpu_input(name, value)

    def bind_ortvalue_input(self, name: str, value) -> None:
        self.inputs[name] = value
        self.binding.bind_ortvalue_input(name, value)

    def __getattr__(self, name: str):
        return getattr(self.binding, name)


class _RecordingSession:
    """An ONNX Runtime session that records the feeds of its first run (plain or with an IOBinding)."""

    def __init__(self, session, key: str, record: dict[str, dict[str, np.ndarray]]):
        self.session, self.key, self.record = session, key, record

    def run(self, names, feeds, *args, **kwargs):
        self.record.setdefault(self.key, {k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.session.run(names, feeds, *args, **kwargs)

    def io_binding(self):
        return _RecordingBinding(self.session.io_binding())

    def run_with_iobinding(self, binding, *args, **kwargs):
        if self.key not in self.record:  # the cache tensors as they are before the first decode step
            feeds = {k: v if isinstance(v, np.ndarray) else v.numpy() for k, v in binding.inputs.items()}
            self.record[self.key] = feeds
        return self.session.run_with_iobinding(binding.binding, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.session, name)


@contextlib.contextmanager
def _recording(root: Path, record: dict[str, dict[str, np.ndarray]]) -> Iterator[None]:
    """While active, every :class:`~tokensieve.runtimes.ort.OrtRunner` made records its first feeds into
    ``record`` under its graph's path relative to ``root``."""
    from tokensieve.runtimes.ort import OrtRunner

    original = OrtRunner.__init__

    def init(self, path, *args, **kwargs) -> None:
        original(self, path, *args, **kwargs)
        key = Path(path).resolve().relative_to(root.resolve()).as_posix()
        self.session = _RecordingSession(self.session, key, record)

    OrtRunner.__init__ = init
    try:
        yield
    finally:
        OrtRunner.__init__ = original


def sample_image(artifact) -> np.ndarray:
    """A fixed RGB image of the vision tower's input size."""
    side = int(artifact.manifest.host.get("image_size", 224))
    return np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)


def sample_feeds(artifact) -> dict[str, dict[str, np.ndarray]]:
    """Relative graph path -> the feeds of its first call while the artifact generates two tokens for
    :func:`sample_image` and the longest of :data:`SAMPLE_PROMPTS` the cache takes, with every cache the artifact
    has (the fixed-capacity ``decode`` and the growing ``decode_growing`` graph)."""
    graphs = artifact.manifest.graphs
    caches = [cache for cache, key in (("fixed", "decode"), ("growing", "decode_growing")) if key in graphs]
    record: dict[str, dict[str, np.ndarray]] = {}
    with _recording(artifact.path, record):
        for cache in caches:
            for prompt in SAMPLE_PROMPTS:
                try:
                    artifact.generate(sample_image(artifact), prompt, 2, cache=cache)
                    break
                except CapacityError:
                    continue
    return record


def golden_at_batch(golden: Path, batch: int, out: Path) -> None:
    """Write ``golden``'s inputs and eager outputs into ``out`` as iterations of ``batch`` images (the last one
    padded by repeating its last image)."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import load_json, save_json

    from tokensieve.parity.report import EAGER

    feeds: dict[str, Any] = dict(load_json(str(golden / "inputs.json"))[0])
    eager = dict(RunResults.load(str(golden / "eager_outputs.json"))[0][1][0])
    images = len(next(iter(feeds.values())))

    def chunks(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        parts = []
        for start in range(0, images, batch):
            part = {k: np.asarray(v)[start : start + batch] for k, v in arrays.items()}
            short = batch - len(next(iter(part.values())))
            parts.append({k: np.concatenate([v, np.repeat(v[-1:], short, 0)]) for k, v in part.items()})
        return parts

    out.mkdir(parents=True, exist_ok=True)
    save_json(chunks(feeds), str(out / "inputs.json"), description=f"golden inputs in batches of {batch}")
    results = RunResults()
    results.append((EAGER, [IterationResult(part, runner_name=EAGER) for part in chunks(eager)]))
    results.save(str(out / "eager_outputs.json"))
