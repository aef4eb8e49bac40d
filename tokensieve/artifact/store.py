"""The artifact directory: ONNX graphs plus ``manifest.json``, written atomically.

Layout::

    DIR/
      manifest.json     source, method, tokens per block, MACs, I/O, opset, lint result, versions
      model.onnx        the token-reduced graph (or the unreduced one for ``--method none``)
      baseline.onnx     the unreduced graph (absent for ``--method none``: model.onnx is the baseline)
      weights.data      external weights, shared by both graphs (the passes add only small constants)
      golden/           Polygraphy-format inputs and eager/ORT outputs, written by ``tokensieve parity``

The manifest records a SHA-256 of every file written at export (``files``), so a registry gate
(:mod:`tokensieve.gate`) can tell an artifact that changed after export from the one that was checked.

Everything is written into a hidden sibling directory first and renamed into place at the end, so a failure never
leaves a half-written artifact; an existing artifact at the destination is replaced only after success.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from tokensieve import manifest as manifest_file
from tokensieve.errors import ArtifactError, GraphRewriteError, first_line
from tokensieve.manifest import FORMAT, MANIFEST, WEIGHTS, Manifest
from tokensieve.onnx_file import load_onnx

ENGINES = "engines"  # where `tokensieve build` and the staged trtexec recipes (trt/build_*.sh) put their plans
_VERSIONED = ("torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "timm", "transformers")
_ALIGNMENT = 64
_INLINE_BYTES = 1024  # smaller initializers stay inside the .onnx file


def _is_artifact(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def replaced_directory(out: Path, hint: str = "") -> Iterator[Path]:
    """Yield a hidden sibling directory of ``out`` to fill; on success it takes ``out``'s place (an old ``out`` is
    removed), on failure it is removed and ``out`` stays as it was. ``hint`` ends the can't-write message."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as e:
        raise ArtifactError(f"cannot write to {out.parent}: {e.strerror}{hint}") from None
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


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out).absolute()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_artifact(out))):
        raise ArtifactError(f"{out} exists and is not a tokensieve artifact; choose another --out or remove it")
    with replaced_directory(out, "; choose a writable --out") as staging:
        yield staging


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"cannot write {path}: {e.strerror}") from None


def file_digests(directory: Path, only: Collection[str] | None = None) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` (relative POSIX path -> hex digest), the manifest excluded; with
    ``only``, of those of the named files that exist (engines built later are not read)."""
    digests = {}
    files = directory.rglob("*") if only is None else (directory / name for name in only)
    for path in sorted(p for p in files if p.is_file() and p.name != MANIFEST):
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        digests[path.relative_to(directory).as_posix()] = sha.hexdigest()
    return digests


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` last, with the digests of every file already in ``directory``."""
    manifest_file.dump(directory, manifest, file_digests(directory))


def save_graph(model: ir.Model, path: Path, weights: bool) -> None:
    """Save one graph; ``weights=True`` writes its initializers to the shared ``weights.data`` file, otherwise
    weights that already live in that file stay references to it (only new, small constants are inlined)."""
    ir.save(model, path, external_data=WEIGHTS if weights else None)


def save_baseline(directory: Path, baseline: ir.Model) -> ir.Model:
    """Write ``baseline.onnx`` + ``weights.data``; return a fresh copy whose weights reference that file."""
    path = directory / "baseline.onnx"
    save_graph(baseline, path, weights=True)
    return ir.load(path)


def save_shared(graphs: dict[str, ir.Model], directory: Path, files: dict[str, str]) -> None:
    """Save several graphs into ``directory`` (``files``: key -> file name) with their weights stored once, in the
    shared ``weights.data``: initializers with the same dtype, shape and bytes (the decoder layers that prefill and
    the decode graphs share) are written once and referenced by every graph."""
    written: dict[tuple, tuple[int, int]] = {}
    with open(directory / WEIGHTS, "wb") as blob:
        for key, model in graphs.items():
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes < _INLINE_BYTES:
                    continue
                data = tensor.tobytes()
                digest = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(data).digest())
                if digest not in written:
                    blob.write(b"\0" * (-blob.tell() % _ALIGNMENT))
                    written[digest] = (blob.tell(), len(data))
                    blob.write(data)
                offset, length = written[digest]
                value.const_value = ir.ExternalTensor(
                    WEIGHTS, offset, length, tensor.dtype, shape=tensor.shape, name=value.name, base_dir=directory
                )
            ir.save(model, directory / files[key])


def versions() -> dict[str, str]:
    """Installed versions of tokensieve and the libraries an export depends on."""
    out = {}
    for name in ("tokensieve", *_VERSIONED):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe_io(model: ir.Model) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes (symbolic dims by name) of a graph's inputs and outputs."""

    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": v.dtype.name if v.dtype else None,
                "shape": [d if isinstance(d, int) else d.value for d in v.shape] if v.shape is not None else None,
            }
            for v in values
        ]

    return describe(model.graph.inputs), describe(model.graph.outputs)


def check_file(path: Path) -> None:
    """onnx's full checker (with strict shape inference) on the saved file, external weights included."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphRewriteError(f"{path.name} fails onnx's checker: {first_line(e)}") from e


def plan_path(artifact: Artifact, onnx: str) -> Path:
    """``DIR/engines/<stem>.plan`` for the graph at the relative path ``onnx``."""
    return artifact.path / ENGINES / f"{Path(onnx).stem}.plan"


class Artifact:
    """A tokensieve artifact directory: run it, inspect it, check its parity, lint it, benchmark it."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | os.PathLike) -> Artifact:
        path = Path(path)
        artifact = cls(path, manifest_file.read(path))
        for relative in artifact.manifest.graphs.values():
            if not (path / relative).is_file():
                raise ArtifactError(f"artifact {path} is incomplete: {relative} is missing")
        return artifact

    @property
    def kind(self) -> str:
        """``"image"`` (one image model), ``"staged"`` (an adaptive method's bucket graphs) or ``"mllm"`` (vision /
        embed / prefill / decode graphs): the type of the manifest."""
        return self.manifest.kind

    def graph_path(self, key: str = "model") -> Path:
        if key not in self.manifest.graphs:
            raise ArtifactError(f"{self.path} has no graph {key!r}; its graphs: {', '.join(self.manifest.graphs)}")
        return self.path / self.manifest.graphs[key]

    @property
    def methods(self) -> list:
        from tokensieve.methods import methods_from_dicts

        return methods_from_dicts(self.manifest.methods)

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.manifest.inputs[0]

    def runner(self, graph: str = "model", runtime: str = "onnxruntime", **kwargs):
        """A runner of one graph: ONNX Runtime (``kwargs``: providers, threads, ...), or ``runtime="tensorrt"``
        for the engine ``tokensieve build`` wrote (the ONNX Runtime options do not apply)."""
        if runtime == "tensorrt":
            from tokensieve.runtimes.tensorrt import TensorRTRunner

            return TensorRTRunner(plan_path(self, str(self.graph_path(graph).relative_to(self.path))))
        if runtime != "onnxruntime":
            raise ArtifactError(f"unknown runtime {runtime!r}; choose onnxruntime or tensorrt")
        from tokensieve.runtimes.ort import OrtRunner

        return OrtRunner(self.graph_path(graph), **kwargs)

    def staged_runner(self, mode: str = "bucketed", runtime: str = "onnxruntime", **kwargs):
        """The bucket dispatcher of a staged artifact (:class:`tokensieve.runtimes.buckets.StagedRunner`) on ONNX
        Runtime (``kwargs``: its options and the runner's), or on the engines ``tokensieve build`` wrote: every stage
        graph, the symbolic-K chain (``mode="oracle"``) and the pad-to-max graph have one."""
        from tokensieve.runtimes.buckets import StagedRunner

        if self.kind != "staged":
            raise ArtifactError(f"{self.path} is not a staged artifact (export an adaptive method with --buckets)")
        if runtime == "tensorrt":
            if kwargs.get("expose"):
                raise ArtifactError("an engine has no debug outputs: the kept tokens are exposed on ONNX Runtime only")
            from tokensieve.runtimes.tensorrt import TensorRTRunner

            kwargs["runner_factory"] = lambda relative, extra: TensorRTRunner(plan_path(self, relative))
        elif runtime != "onnxruntime":
            raise ArtifactError(f"unknown runtime {runtime!r}; choose onnxruntime or tensorrt")
        return StagedRunner(self.path, self.manifest.stages, mode=mode, **kwargs)

    def check_output(self, out: str | os.PathLike, what: str, replaced: bool) -> None:
        """Refuse an output that is this artifact or lies inside it (the artifact would be overwritten, or copied
        into itself), or, when the output is ``replaced`` as a whole, one that holds the artifact."""
        target, own = Path(out).resolve(), self.path.resolve()
        if target == own or own in target.parents or (replaced and target in own.parents):
            where = "is" if target == own else "is inside" if own in target.parents else "holds"
            raise ArtifactError(f"{what} {out} {where} the artifact {self.path}; write it somewhere else")

    def llava_runner(self, **kwargs):
        from tokensieve.runtimes.llava import LlavaRunner

        if self.kind != "mllm":
            raise ArtifactError(f"{self.path} holds an image model; generate() needs an MLLM artifact (hf:llava-tiny)")
        return LlavaRunner.from_artifact(self, **kwargs)

    def graph_files(self) -> list[tuple[str, bool]]:
        """Every deployable graph: ``(relative path, has symbolic shapes meant for optimization profiles)``."""
        if self.kind == "mllm":
            dynamic = self.manifest.dynamic
            return [(rel, key in dynamic) for key, rel in self.manifest.graphs.items() if key != "external_data"]
        if self.kind == "image":
            return [(self.manifest.graphs["model"], False)]
        stages = self.manifest.stages
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
            model = load_onnx(self.path / relative)
            if self.kind != "mllm":  # MLLM graphs keep the shapes annotated at export (symbolic sequence axes)
                propagate_shapes(model)
            report = lint(model, target, profiles=profiles)
            combined.findings += [
                replace(f, node=f"{relative}:{f.node}" if f.node else relative, op=f.op or "graph")
                for f in report.findings
            ]
        return combined

    def __repr__(self) -> str:
        source, method = self.manifest.source["name"], self.manifest.method_text
        return f"Artifact({str(self.path)!r}, source={source!r}, method={method!r})"
