"""The facade: ``tokensieve.export(...)`` builds an artifact, ``tokensieve.load(DIR)`` opens one, and
:class:`Artifact` adds the verbs (parity, bench, inspect, quantize, build, triton, jetson, generate) to the stored
artifact of :mod:`tokensieve.artifact.store`. Nothing inside the package imports this module.

Data flow: model source -> converter (torch -> ONNX) -> graph passes -> artifact (ONNX + manifest) -> runtime; the
eager reference and the checks (parity, bench, gate) sit beside it, deployment (TensorRT, Triton, Jetson) on top.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from tokensieve.artifact import store
from tokensieve.errors import ArtifactError, check_positive
from tokensieve.exporter import dispatch as _exporter


class Artifact(store.Artifact):
    """A tokensieve artifact directory: run it, inspect it, check its parity, lint it, benchmark it, deploy it."""

    def build(self, **kwargs) -> dict:
        """TensorRT engines for every graph, into ``DIR/engines/`` (:func:`tokensieve.deploy.build.build_engines`)."""
        from tokensieve.deploy.build import build_engines

        return build_engines(self, **kwargs)

    def quantize(self, data, out: str | os.PathLike, **kwargs) -> Artifact:
        """An INT8 (QDQ) copy at ``out`` calibrated on the batch ``data [N, C, H, W]``
        (:func:`tokensieve.quantize.image.quantize_artifact`); returns the new artifact."""
        from tokensieve.quantize.image import quantize_artifact

        self.check_output(out, "--out", replaced=True)
        return type(self).of(quantize_artifact(self, data, out, **kwargs))

    def triton(self, out: str | os.PathLike, **kwargs) -> list[str]:
        """Write this artifact into a Triton model repository (:func:`tokensieve.deploy.triton.write_repository`);
        returns the model names, the one clients call first."""
        from tokensieve.deploy.triton import write_repository

        self.check_output(out, "the model repository", replaced=False)
        return write_repository(self, out, **kwargs)

    def jetson(self, out: str | os.PathLike, **kwargs) -> dict:
        """Write a Jetson bundle (:func:`tokensieve.deploy.jetson.write_bundle`); returns its ``bundle.json``."""
        from tokensieve.deploy.jetson import write_bundle

        self.check_output(out, "the bundle", replaced=True)
        return write_bundle(self, out, **kwargs)

    def run(self, pixel_values, graph: str = "model", **kwargs) -> dict:
        """Run the graph on a numpy batch with ONNX Runtime (CPU unless ``providers=`` says otherwise)."""
        from tokensieve.runtimes.pixels import check_pixels

        if self.kind == "mllm":
            raise ArtifactError("an MLLM artifact runs with Artifact.generate(image, prompt), not run()")
        shape = self.manifest.preprocessing.get("shape")
        check_pixels(pixel_values, shape, self.manifest.export.get("batch"))
        runner = self.runner(graph, **kwargs)
        return runner.run({runner.input_names[0]: pixel_values})

    def generate(self, image=None, prompt: str = "", max_new_tokens: int = 32, cache: str = "fixed", **kwargs):
        """MLLM artifacts: greedy generation on ONNX Runtime (see :class:`tokensieve.runtimes.llava.LlavaRunner`)."""
        return self.llava_runner(cache=cache).generate(image, prompt, max_new_tokens, **kwargs)

    def inspect(self) -> dict[str, Any]:
        from tokensieve.inspect.image import inspect_artifact

        return inspect_artifact(self)

    def parity(self, **kwargs):
        """Exported graphs vs the eager reference, on values and kept tokens; writes the golden files."""
        from tokensieve.parity.by_kind import CHECK

        return self._call(CHECK[self.kind], kwargs)

    def replay(self, **kwargs):
        """Parity against the golden files ``parity`` wrote, torch-free."""
        from tokensieve.parity.by_kind import REPLAY

        return self._call(REPLAY[self.kind], kwargs)

    def bench(self, **kwargs):
        """Latency of the reduced graphs against the unreduced ones."""
        from tokensieve.bench.by_kind import BENCH

        return self._call(BENCH[self.kind], kwargs)

    def eval(self, data, baseline: str | os.PathLike | Artifact | None = None, **kwargs):
        """Quality against the unreduced model on ``data`` (:func:`tokensieve.evaluate.evaluate`): images for image
        models, a JSONL of prompts for MLLMs (``baseline``: the unreduced MLLM artifact); writes ``eval.json``."""
        from tokensieve.evaluate import evaluate

        return evaluate(self, data, _opened(baseline), **kwargs)

    @classmethod
    def of(cls, stored: store.Artifact) -> Artifact:
        """The facade over an artifact a verb has just written and loaded (its manifest is not read again)."""
        return cls(stored.path, stored.manifest)

    def _call(self, function, kwargs: dict[str, Any]):
        """``function(self, **kwargs)``, or an error naming the options this kind of artifact does not take (or a
        tolerance that is not a finite number above 0)."""
        if kwargs.get("tolerance") is not None:
            check_positive("tolerance", kwargs["tolerance"])
        accepted = set(inspect.signature(function).parameters) - {"artifact"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            kind = "an MLLM" if self.kind == "mllm" else "an image-model"
            raise ArtifactError(
                f"{function.__name__} of {kind} artifact takes no {', '.join(unknown)}; it takes "
                f"{', '.join(sorted(accepted))}"
            )
        return function(self, **kwargs)


@functools.wraps(_exporter.export)
def export(*args: Any, **kwargs: Any) -> Artifact:
    return Artifact.of(_exporter.export(*args, **kwargs))


def sweep(source: str, method: str, data: str | os.PathLike, out: str | os.PathLike, **kwargs: Any):
    """Export every strength of the grid ``method`` (``"tome(r=[4,8,12,16])"``), evaluate and time each, chart the
    quality against latency (:func:`tokensieve.evaluate.sweep.sweep`); returns the sweep report."""
    from tokensieve.evaluate.sweep import sweep as run_sweep

    if "baseline" in kwargs:
        kwargs["baseline"] = _opened(kwargs["baseline"])
    return run_sweep(source, method, data, out, **kwargs)


def _opened(artifact: str | os.PathLike | store.Artifact | None) -> store.Artifact | None:
    """An artifact given as an object or as its directory."""
    return artifact if artifact is None or isinstance(artifact, store.Artifact) else load(artifact)


def load(path: str | os.PathLike) -> Artifact:
    """Open an artifact directory written by :func:`export`."""
    return Artifact.load(path)
