"""``tokensieve triton``: a Triton Inference Server model repository from an artifact.

Layout written into ``REPO`` (``NAME`` defaults to the artifact folder's name)::

    single-graph artifact (pruned / merged / quantized ViT):
      NAME/config.pbtxt, NAME/1/model.onnx/model.onnx + weights.data
                                                                ONNX Runtime backend (``--backend onnxruntime``; a
                                                                model with external data is a directory, as Triton's
                                                                model repository documentation asks)
                         NAME/1/model.plan                      TensorRT backend (``--backend tensorrt``: the engine
                                                                ``tokensieve build`` wrote for this GPU)
    staged artifact (adaptive pruning served with buckets):
      NAME_stage1/, NAME_stage2_b64/, NAME_stage3_b128_64/ ...  one model per stage graph and bucket (static token
                                                                shapes), the same two backends
      NAME_padmax/                                              the pad-to-max single graph (the simple alternative)
      NAME/config.pbtxt, NAME/1/model.py, NAME/1/routing.json   the router: a Python-backend model that serves the
                                                                artifact's input and outputs and runs tokensieve's
                                                                dispatcher with the stage models as its runners
    MLLM artifact:
      NAME/config.pbtxt, NAME/1/model.py, NAME/1/artifact/      a Python-backend model running tokensieve's generation
                                                                loop on the artifact with ONNX Runtime (prompt and
                                                                optional image in, text and ids out)

The router (:mod:`tokensieve.deploy.triton_router`, copied as ``model.py``) calls the stage models through Triton's
Business Logic Scripting: an ensemble is a static graph and cannot route by count (docs/deploy.md#triton). Token-level
outputs come back zero-padded to the largest last bucket, with ``kept_tokens`` and ``buckets`` ([batch, sites]) saying
which rows are valid and where each image ran. The Python backend needs ``tokensieve`` importable (``pip install
--no-deps tokensieve`` plus numpy: the dispatcher imports neither torch nor onnx).

Dimensions follow Triton's rules: with a symbolic ``batch`` axis the models batch (``max_batch_size``, dims without
it, an output of shape [batch] as ``dims: [1]`` with an empty ``reshape``) and use dynamic batching; a static batch
gives ``max_batch_size: 0`` and full dims. Triton hands a tensor with a ``reshape`` to the model in the ``reshape``
shape but to its callers (clients, and the router's BLS requests) in the ``dims`` shape (batch + ``[1]`` for a
``[batch]`` tensor), so ``routing.json`` records those tensors and the router converts both ways.

With ``--backend tensorrt`` each model takes the batch range of its engine's profile (``engines/build.json``): an
engine built for a fixed batch (a Jetson bundle's DLA engines, min = opt = max) gets ``max_batch_size: 0`` and that
batch in its dims (Triton's TensorRT backend refuses a ``max_batch_size`` beyond the profile), the router feeding it
in chunks of that batch; a DLA engine's instance group names the core as ``secondary_devices { kind: KIND_NVDLA }``.

Models are written into a hidden folder inside ``REPO`` first and swapped into place only when all are complete; a
model folder not written by tokensieve is never replaced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from tokensieve.artifact.store import ENGINES, WEIGHTS, describe_io, plan_path
from tokensieve.deploy.files import copy_artifact
from tokensieve.errors import ArtifactError

BACKENDS = ("onnxruntime", "tensorrt")
KINDS = ("auto", "gpu", "cpu")
MARK = "# written by tokensieve triton"
ROUTER = Path(__file__).with_name("triton_router.py")
DEFAULT_MAX_BATCH = 8
_TYPES = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
    "INT8": "TYPE_INT8",
    "UINT8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL",
    "STRING": "TYPE_STRING",
}
GENERATOR = Path(__file__).with_name("triton_generate.py")
# what the generation model imports in Triton's Python backend (tokensieve itself: pip install --no-deps tokensieve)
GENERATOR_REQUIREMENTS = "numpy\nonnxruntime  # or onnxruntime-gpu\nonnx-ir\ntokenizers\npillow\n"


@dataclass
class ModelSpec:
    """One model of the repository: its config and the files of version 1."""

    name: str
    inputs: list[dict]
    outputs: list[dict]
    batching: bool
    platform: str = ""
    backend: str = ""
    kind: str = "auto"
    source: Path | None = None  # the .onnx or .plan copied into the version folder
    files: dict[str, str] = field(default_factory=dict)  # extra version-folder files: name -> text
    artifact: Any = None  # an artifact copied whole into the version folder's artifact/
    dla_core: int | None = None  # a DLA engine's core (Triton: a KIND_NVDLA secondary device)

    def config(self, max_batch: int) -> str:
        lines = [MARK, f'name: "{self.name}"']
        lines += [f'platform: "{self.platform}"'] if self.platform else [f'backend: "{self.backend}"']
        lines.append(f"max_batch_size: {max_batch if self.batching else 0}")
        for section, tensors in (("input", self.inputs), ("output", self.outputs)):
            entries = [_tensor(t, self.batching) for t in tensors]
            lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
        if self.kind != "auto" or self.dla_core is not None:
            kind = "gpu" if self.dla_core is not None else self.kind
            dla = (
                ""
                if self.dla_core is None
                else f" secondary_devices [ {{ kind: KIND_NVDLA device_id: {self.dla_core} }} ]"
            )
            lines.append(f"instance_group [ {{ kind: KIND_{kind.upper()} count: 1{dla} }} ]")
        if self.batching:
            lines.append("dynamic_batching { }")
        return "\n".join(lines) + "\n"

    def write(self, folder: Path, max_batch: int) -> None:
        version = folder / "1"
        version.mkdir(parents=True)
        (folder / "config.pbtxt").write_text(self.config(max_batch))
        if self.source is not None and self.source.suffix == ".onnx":
            # each model gets the weights it uses in its own folder (Triton loads every version folder on its own);
            # a model with external data is the directory model.onnx/ holding model.onnx and its data file
            (version / "model.onnx").mkdir()
            ir.save(ir.load(self.source), version / "model.onnx" / "model.onnx", external_data=WEIGHTS)
        elif self.source is not None:
            shutil.copyfile(self.source, version / "model.plan")
        for name, text in self.files.items():
            (version / name).write_text(text)
        if self.artifact is not None:
            copy_artifact(self.artifact, version / "artifact")


def triton_dims(shape: Sequence, batching: bool) -> tuple[list[int], list[int] | None]:
    """A tensor's config ``dims`` and ``reshape`` (None: no reshape): a [batch] tensor of a batching model is
    ``dims: [1]`` reshaped to ``[]``, which is how Triton names a tensor with no axis besides the batch."""
    dims = [d if isinstance(d, int) else -1 for d in (shape[1:] if batching else shape)]
    if batching and not dims:
        return [1], []
    return dims, None


def _tensor(spec: dict, batching: bool) -> str:
    dtype = _TYPES.get(spec["dtype"])
    if dtype is None:
        raise ArtifactError(f"tensor {spec['name']!r} has the type {spec['dtype']}, which Triton configs cannot name")
    dims, shape = triton_dims(spec["shape"], batching)
    reshape = "" if shape is None else f" reshape: {{ shape: [ {', '.join(map(str, shape))} ] }}"
    optional = " optional: true" if spec.get("optional") else ""
    return f'  {{ name: "{spec["name"]}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{reshape}{optional} }}'


def fixed_batch(profile: dict[str, list[list[int]]]) -> int | None:
    """The batch an engine's profile fixes (every input's leading axis with min = max, all alike), or None."""
    batches = {(shapes[0][0], shapes[2][0]) for shapes in profile.values() if shapes[0]}
    if len(batches) != 1:
        return None
    low, high = batches.pop()
    return low if low == high else None


def _wire(spec: ModelSpec) -> dict[str, Any]:
    """What the router needs to call ``spec`` through BLS: its tensor names, the tensors Triton reshapes (their
    ``dims`` and ``reshape`` shape, batch axis left out) and the fixed batch of a non-batching model."""
    reshape = {}
    for tensor in spec.inputs + spec.outputs:
        dims, shape = triton_dims(tensor["shape"], spec.batching)
        if shape is not None:
            reshape[tensor["name"]] = {"dims": dims, "shape": shape}
    first = spec.inputs[0]["shape"][0] if spec.inputs and spec.inputs[0]["shape"] else None
    return {
        "model": spec.name,
        "inputs": [t["name"] for t in spec.inputs],
        "outputs": [t["name"] for t in spec.outputs],
        "reshape": reshape,
        "batch": None if spec.batching or not isinstance(first, int) else first,
    }


def _batching(specs: Sequence[dict]) -> bool:
    """True when every tensor's first axis is the symbolic ``batch`` axis (a dynamic-batch export)."""
    return all(s["shape"] and s["shape"][0] == "batch" for s in specs)


class RepositoryPlan:
    """The models one artifact becomes; everything is checked before anything is written."""

    def __init__(self, artifact, name: str, backend: str, kind: str):
        if backend not in BACKENDS:
            raise ArtifactError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if kind not in KINDS:
            raise ArtifactError(f"unknown instance kind {kind!r}; choose one of {', '.join(KINDS)}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ArtifactError(f"{name!r} is not a usable Triton model name; give --name with letters, digits, _ . -")
        if artifact.kind == "mllm" and backend != "onnxruntime":
            raise ArtifactError(
                "an MLLM artifact is served by a Python-backend model that generates with ONNX Runtime (the KV cache "
                "lives on the host between the graphs); bundle it with --backend onnxruntime"
            )
        self.artifact, self.name, self.backend = artifact, name, backend
        self.kind = "gpu" if backend == "tensorrt" and kind == "auto" else kind
        self.engines: dict[str, dict] = {}
        self.built = self._built_max_batch()
        if artifact.kind == "mllm":
            self.models = [self._generator(name)]
        elif artifact.kind == "staged":
            self.models = self._staged(artifact.manifest.stages)
        else:
            self.models = [self._graph(name, artifact.manifest.graphs["model"])]

    def _built_max_batch(self) -> int | None:
        if self.backend != "tensorrt":
            return None
        build = self.artifact.path / ENGINES / "build.json"
        if not build.is_file():
            raise ArtifactError(
                f"{self.artifact.path} has no TensorRT engines; run `tokensieve build {self.artifact.path}` on the "
                "GPU that will serve them, or bundle with --backend onnxruntime"
            )
        report = json.loads(build.read_text())
        self.engines = report.get("engines", {})
        return report["ranges"]["batch"][2]

    def _graph(self, name: str, relative: str) -> ModelSpec:
        onnx = self.artifact.path / relative
        inputs, outputs = describe_io(ir.load(onnx))
        spec = ModelSpec(name, inputs, outputs, _batching(inputs + outputs), kind=self.kind)
        if self.backend == "onnxruntime":
            spec.platform, spec.source = "onnxruntime_onnx", onnx
            return spec
        plan = plan_path(self.artifact, relative)
        if not plan.is_file():
            raise ArtifactError(f"{plan} is missing; rebuild the engines with `tokensieve build`")
        spec.platform, spec.source = "tensorrt_plan", plan
        engine = self.engines.get(relative, {})
        spec.dla_core = engine.get("dla_core")
        batch = fixed_batch(engine.get("profile") or {})
        if spec.batching and batch is not None:  # min = opt = max: Triton may not batch it (see module docstring)
            spec.batching = False
            spec.inputs = [{**t, "shape": [batch, *t["shape"][1:]]} for t in spec.inputs]
            spec.outputs = [{**t, "shape": [batch, *t["shape"][1:]]} for t in spec.outputs]
        return spec

    def _generator(self, name: str) -> ModelSpec:
        """An MLLM artifact: one Python-backend model that runs tokensieve's generation loop (LlavaRunner) on the
        artifact's graphs with ONNX Runtime: a prompt and an optional RGB image in, the text and token ids out."""
        cache = "fixed" if "decode" in self.artifact.manifest.graphs else "growing"
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.kind == "gpu" else ["CPUExecutionProvider"]
        )
        settings = {"cache": cache, "providers": providers, "max_new_tokens": 32}
        return ModelSpec(
            name,
            [
                {"name": "prompt", "dtype": "STRING", "shape": [1]},
                {"name": "image", "dtype": "UINT8", "shape": ["height", "width", 3], "optional": True},
                {"name": "max_new_tokens", "dtype": "INT32", "shape": [1], "optional": True},
            ],
            [{"name": "text", "dtype": "STRING", "shape": [1]}, {"name": "ids", "dtype": "INT64", "shape": ["new"]}],
            batching=False,
            backend="python",
            kind="cpu" if self.kind == "auto" else self.kind,
            files={
                "model.py": GENERATOR.read_text(),
                "generate.json": json.dumps(settings, indent=2),
                "requirements.txt": GENERATOR_REQUIREMENTS,
            },
            artifact=self.artifact,
        )

    def _staged(self, stages: dict[str, Any]) -> list[ModelSpec]:
        graphs, sites, specials = stages["graphs"], len(stages["sites"]), int(stages["specials"])
        models = {
            relative: self._graph(f"{self.name}_{Path(relative).stem}", relative)
            for relative in dict.fromkeys([*graphs.values(), stages["padmax"]])
        }
        # the router serves the artifact's own input and outputs (ONNX shapes), whatever batch the engines fix
        first_inputs, _ = describe_io(ir.load(self.artifact.path / graphs[""]))
        last = {
            int(key.split("/")[-1]): describe_io(ir.load(self.artifact.path / rel))[1]
            for key, rel in graphs.items()
            if key and key.count("/") == sites - 1
        }
        slots = max(last)

        def token_level(name: str) -> bool:  # in every last-stage graph, axis 1 holds the specials + its bucket
            shapes = [next(o["shape"] for o in outputs if o["name"] == name) for outputs in last.values()]
            return all(len(s) > 2 and s[1] == specials + k for s, k in zip(shapes, last, strict=True))

        outputs = [
            {**o, "shape": [o["shape"][0], specials + slots, *o["shape"][2:]]} if token_level(o["name"]) else o
            for o in last[slots]
        ]
        route = {"dtype": "INT64", "shape": [first_inputs[0]["shape"][0], sites]}
        routing = {
            "input": first_inputs[0]["name"],
            "stages": stages,
            "slots": slots,
            "models": {relative: _wire(spec) for relative, spec in models.items()},
        }
        router = ModelSpec(
            self.name,
            first_inputs,
            [*outputs, {"name": "kept_tokens", **route}, {"name": "buckets", **route}],
            _batching(first_inputs + outputs),
            backend="python",
            kind="cpu",
            files={"model.py": ROUTER.read_text(), "routing.json": json.dumps(routing, indent=2)},
        )
        return [router, *models.values()]

    def max_batch(self, requested: int | None) -> int:
        if requested is not None and requested < 1:
            raise ArtifactError(f"--max-batch must be at least 1, not {requested}")
        if requested is not None and not any(m.batching for m in self.models):
            raise ArtifactError(
                f"--max-batch {requested}: no model of this artifact batches (a static batch, or an MLLM); leave it "
                "out, or export with --dynamic-batch"
            )
        if self.built is not None and requested is not None and requested > self.built:
            raise ArtifactError(
                f"--max-batch {requested} exceeds the engines' profile maximum {self.built}; rebuild with "
                f"`tokensieve build --max-batch {requested}`"
            )
        return requested or self.built or DEFAULT_MAX_BATCH


def _ours(folder: Path) -> bool:
    try:
        return (folder / "config.pbtxt").read_text().startswith(MARK)
    except OSError:
        return False


def write_repository(
    artifact,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    backend: str = "onnxruntime",
    max_batch: int | None = None,
    kind: str = "auto",
) -> list[str]:
    """Write ``artifact`` into the Triton model repository ``out`` (see module docstring); returns the model names,
    the one clients call first."""
    plan = RepositoryPlan(artifact, name or artifact.path.resolve().name, backend, kind)
    batch = plan.max_batch(max_batch)
    out = Path(out)
    clashes = [m.name for m in plan.models if (out / m.name).exists() and not _ours(out / m.name)]
    if clashes:
        raise ArtifactError(
            f"{out} already holds model folder(s) {clashes} that tokensieve did not write; choose another --name"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tokensieve-", dir=out))
    except OSError as e:
        raise ArtifactError(f"cannot write the repository {out}: {e.strerror}; choose a writable --out") from None
    try:
        for model in plan.models:
            model.write(staging / model.name, batch)
        for model in plan.models:  # every model is complete: swap them in (an old version goes to staging)
            target = out / model.name
            if target.exists():
                target.rename(staging / f".old-{model.name}")
            (staging / model.name).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [m.name for m in plan.models]
