"""The artifact directory: ONNX graphs plus ``manifest.json``, written atomically.

Layout::

    DIR/
      manifest.json     source, method, tokens per block, MACs, I/O, opset, lint result, versions
      model.onnx        the token-reduced graph (or the unreduced one for ``--method none``)
      baseline.onnx     the unreduced graph (absent for ``--method none``: model.onnx is the baseline)
      weights.data      external weights, shared by both graphs (the passes add only small constants)
      golden/           Polygraphy-format inputs and eager/ORT outputs, written by ``tokensieve parity``

Everything is written into a hidden sibling directory first and renamed into place at the end, so a failure never
leaves a half-written artifact; an existing artifact at the destination is replaced only after success.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir

from tokensieve.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT = "tokensieve-artifact"
FORMAT_VERSION = 1
WEIGHTS = "weights.data"


def _is_artifact(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out).absolute()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_artifact(out))):
        raise ArtifactError(f"{out} exists and is not a tokensieve artifact; choose another --out or remove it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as e:
        raise ArtifactError(f"cannot write to {out.parent}: {e.strerror}; choose a writable --out") from None
    try:
        yield staging
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"cannot write {path}: {e.strerror}") from None


def save_graph(model: ir.Model, path: Path, weights: bool) -> None:
    """Save one graph; ``weights=True`` writes its initializers to the shared ``weights.data`` file, otherwise
    weights that already live in that file stay references to it (only new, small constants are inlined)."""
    ir.save(model, path, external_data=WEIGHTS if weights else None)


def save_baseline(directory: Path, baseline: ir.Model) -> ir.Model:
    """Write ``baseline.onnx`` + ``weights.data``; return a fresh copy whose weights reference that file."""
    path = directory / "baseline.onnx"
    save_graph(baseline, path, weights=True)
    return ir.load(path)


class Artifact:
    """A tokensieve artifact directory: run it, inspect it, check its parity, lint it, benchmark it."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | os.PathLike) -> Artifact:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(
                f"{path} is not a tokensieve artifact (no {MANIFEST}); create one with `tokensieve export`"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as e:
            raise ArtifactError(f"{manifest_path} is not valid JSON: {e}") from None
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{manifest_path} is not a tokensieve manifest")
        artifact = cls(path, manifest)
        for key in ("model", "baseline"):
            if not artifact.graph_path(key).is_file():
                raise ArtifactError(f"artifact {path} is incomplete: {artifact.manifest['graphs'][key]} is missing")
        return artifact

    def graph_path(self, key: str = "model") -> Path:
        return self.path / self.manifest["graphs"][key]

    @property
    def methods(self) -> list:
        from tokensieve.methods import methods_from_dicts

        return methods_from_dicts(self.manifest.get("methods"))

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.manifest["inputs"][0]

    def runner(self, graph: str = "model", **kwargs):
        from tokensieve.runtimes.ort import OrtRunner

        return OrtRunner(self.graph_path(graph), **kwargs)

    def run(self, pixel_values, graph: str = "model", **kwargs) -> dict:
        """Run the graph on a numpy batch with ONNX Runtime (CPU unless ``providers=`` says otherwise)."""
        runner = self.runner(graph, **kwargs)
        return runner.run({runner.input_names[0]: pixel_values})

    def inspect(self) -> dict[str, Any]:
        from tokensieve.inspect import inspect_artifact

        return inspect_artifact(self)

    def parity(self, **kwargs):
        from tokensieve.parity import check_parity

        return check_parity(self, **kwargs)

    def bench(self, **kwargs):
        from tokensieve.bench import bench_artifact

        return bench_artifact(self, **kwargs)

    def graph_files(self) -> list[tuple[str, bool]]:
        """Every deployable graph: ``(relative path, has symbolic shapes meant for optimization profiles)``."""
        stages = self.manifest.get("stages")
        if stages is None:
            return [(self.manifest["graphs"]["model"], False)]
        dynamic = set(stages["dynamic"].values()) - set(stages["graphs"].values())
        paths = [*stages["graphs"].values(), *sorted(dynamic), stages["padmax"]]
        return [(p, p in dynamic) for p in dict.fromkeys(paths)]

    def lint(self, target: str = "trt10.3"):
        """Lint every deployable graph (all stage graphs of a staged artifact); findings name their graph."""
        from dataclasses import replace

        from tokensieve.graph_passes.lint import LintReport, lint
        from tokensieve.graph_passes.propagate import propagate_shapes

        combined = LintReport(target)
        for relative, profiles in self.graph_files():
            model = ir.load(self.path / relative)
            propagate_shapes(model)
            report = lint(model, target, profiles=profiles)
            combined.findings += [
                replace(f, node=f"{relative}:{f.node}" if f.node else relative, op=f.op or "graph")
                for f in report.findings
            ]
        return combined

    def __repr__(self) -> str:
        source, method = self.manifest["source"]["name"], self.manifest["method_text"]
        return f"Artifact({str(self.path)!r}, source={source!r}, method={method!r})"
