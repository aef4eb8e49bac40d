"""Parity: the exported graph (ONNX Runtime) against the eager PyTorch reference of the same method.

Two things must agree on the same inputs:

* **values**: every graph output, ``max |ort - eager| / max |eager|`` (error relative to the output scale) must be
  ``<= tolerance`` (1e-4 by default, fp32);
* **selections**: at every reduction site, the kept-token positions (exposed from the graph as debug outputs
  ``tokensieve/site<k>/kept``) must equal the reference's, sample by sample.

The inputs and both sets of outputs are written in Polygraphy's JSON format under ``DIR/golden/`` so the same
check can be replayed on a TensorRT machine (``polygraphy run model.onnx --trt --load-inputs ...``).
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.errors import ParityError

EAGER = "eager-pytorch"
ORT = "onnxruntime"


@dataclass
class OutputParity:
    name: str
    max_abs: float
    scale: float
    relative: float
    ok: bool


@dataclass
class SiteParity:
    layer: int
    block: str
    kept: int
    samples: int
    identical_samples: int
    min_jaccard: float

    @property
    def ok(self) -> bool:
        return self.identical_samples == self.samples


@dataclass
class ParityReport:
    tolerance: float
    batch: int
    provider: list[str]
    outputs: list[OutputParity] = field(default_factory=list)
    sites: list[SiteParity] = field(default_factory=list)
    golden: str | None = None
    replay: str | None = None

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs) and all(s.ok for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        for s, d in zip(self.sites, data["sites"], strict=True):
            d["ok"] = s.ok
        return data

    def text(self) -> str:
        lines = [
            f"parity: {'PASS' if self.ok else 'FAIL'} (eager PyTorch vs ONNX Runtime {self.provider}, "
            f"batch {self.batch}, tolerance {self.tolerance:g} of output scale)"
        ]
        for o in self.outputs:
            lines.append(
                f"  output {o.name:<20} max|diff| {o.max_abs:.3e}  scale {o.scale:.3e}  "
                f"relative {o.relative:.3e}  {'ok' if o.ok else 'FAIL'}"
            )
        for s in self.sites:
            lines.append(
                f"  site   {s.block:<20} kept {s.kept:>4}  identical kept sets in {s.identical_samples}/"
                f"{s.samples} samples (min Jaccard {s.min_jaccard:.3f})  {'ok' if s.ok else 'FAIL'}"
            )
        if self.golden:
            lines.append(f"  golden files: {self.golden}")
            lines.append(f"  replay on TensorRT: {self.replay}")
        return "\n".join(lines)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(1, len(sa | sb))


def compare_sites(sites: list[dict], eager: dict[int, np.ndarray], graph: dict[str, np.ndarray]) -> list[SiteParity]:
    out = []
    for site in sites:
        ref, got = eager[site["layer"]], graph[site["kept_indices"]]
        identical = sum(int(np.array_equal(np.sort(r), np.sort(g))) for r, g in zip(ref, got, strict=True))
        out.append(
            SiteParity(
                site["layer"],
                site["block"],
                site["kept"],
                len(ref),
                identical,
                min(_jaccard(r, g) for r, g in zip(ref, got, strict=True)),
            )
        )
    return out


def compare_outputs(
    names: list[str], eager: list[np.ndarray], graph: dict[str, np.ndarray], tolerance: float
) -> list[OutputParity]:
    out = []
    for name, ref in zip(names, eager, strict=True):
        got = graph[name]
        if got.shape != ref.shape:
            out.append(OutputParity(name, float("inf"), float(np.abs(ref).max()), float("inf"), False))
            continue
        max_abs = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max())
        scale = float(np.abs(ref).max()) or 1.0
        out.append(OutputParity(name, max_abs, scale, max_abs / scale, max_abs / scale <= tolerance))
    return out


def _reference_module(artifact, reference):
    """The eager module: rebuilt from the manifest's source (checked against its weight hash) or given."""
    from tokensieve.converters.sources import BuiltModel, SourceSpec, build_module, weights_digest

    if reference is not None:
        return reference if isinstance(reference, BuiltModel) else build_module(reference)
    spec = SourceSpec.from_dict(artifact.manifest["source"])
    if spec.kind == "onnx":
        raise ParityError(
            "this artifact was exported from an ONNX file, which has no eager model; pass the PyTorch source it "
            "came from: `tokensieve parity DIR --reference timm:NAME [--weights FILE]`"
        )
    built = build_module(spec)
    expected = artifact.manifest.get("weights_sha256")
    if expected and weights_digest(built.module) != expected:
        raise ParityError(
            f"the eager model rebuilt from {spec.text} does not have the exported weights (hash mismatch: the "
            "weights file changed or torch generates different random weights); re-export, or pass --reference"
        )
    return built


def _write_golden(
    directory: Path, feeds: dict[str, np.ndarray], eager: dict[str, np.ndarray], graph: dict[str, np.ndarray]
) -> Path:
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False
    G_LOGGER.module_severity = G_LOGGER.WARNING

    golden = directory / "golden"
    staging = directory / f".golden.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        save_json([feeds], str(staging / "inputs.json"), description="tokensieve parity inputs")
        for runner, outputs, file in ((EAGER, eager, "eager_outputs.json"), (ORT, graph, "ort_outputs.json")):
            results = RunResults()
            results.append((runner, [IterationResult(outputs, runner_name=runner)]))
            results.save(str(staging / file))
        if golden.exists():
            shutil.rmtree(golden)
        staging.rename(golden)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return golden


def check_parity(
    artifact,
    *,
    reference=None,
    batch: int | None = None,
    seed: int = 0,
    tolerance: float = 1e-4,
    golden: bool = True,
    providers: list[str] | None = None,
) -> ParityReport:
    """Run the eager reference and the artifact's graph on the same seeded inputs and compare them."""
    import torch

    from tokensieve.reference.topk import TopKReference
    from tokensieve.runtimes.ort import OrtRunner

    manifest = artifact.manifest
    method = artifact.method
    built = _reference_module(artifact, reference)
    static_batch = manifest["export"]["batch"]
    if batch is None:
        batch = static_batch or 2
    elif static_batch and batch != static_batch:
        raise ParityError(f"the graph has a static batch of {static_batch}; cannot check batch {batch}")
    specials = (manifest.get("layout") or {}).get("specials")
    eager_model = TopKReference(built.module, method, specials) if method else built.module.eval()
    shape = [batch, *built.input_shape]
    pixels = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        eager_out = eager_model(pixels)
    eager_out = [t.numpy() for t in (eager_out if isinstance(eager_out, (tuple, list)) else (eager_out,))]
    eager_kept = {k: v.numpy() for k, v in eager_model.recorder.kept.items()} if method else {}

    sites = manifest.get("sites", [])
    runner = OrtRunner(
        artifact.graph_path("model"), providers=providers, extra_outputs=[s["kept_indices"] for s in sites]
    )
    feeds = {runner.input_names[0]: pixels.numpy()}
    graph_out = runner.run(feeds)
    names = [o["name"] for o in manifest["outputs"]]
    if len(names) != len(eager_out):
        raise ParityError(f"the graph has {len(names)} outputs but the eager model returns {len(eager_out)}")
    report = ParityReport(
        tolerance,
        batch,
        runner.active,
        compare_outputs(names, eager_out, graph_out, tolerance),
        compare_sites(sites, eager_kept, graph_out),
    )
    if golden:
        directory = _write_golden(
            artifact.path, feeds, dict(zip(names, eager_out, strict=True)), {n: graph_out[n] for n in names}
        )
        report.golden = str(directory)
        report.replay = (
            f"polygraphy run {artifact.graph_path('model')} --trt "
            f"--load-inputs {directory / 'inputs.json'} --load-outputs {directory / 'eager_outputs.json'} "
            "--atol 1e-3 --rtol 1e-3"
        )
    return report
