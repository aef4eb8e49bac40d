"""What every parity check reports and reads: per-output and per-site results, the report, the value comparison,
the tolerance budget and the golden files under ``DIR/golden/`` (read by every artifact kind's replay)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.artifact.store import replaced_directory
from tokensieve.errors import ParityError

GOLDEN = "golden"

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
    method: str
    samples: int
    same_groups: int  # samples whose merge source map (which original tokens each output token holds) matches
    same_order: int  # samples whose output order is identical too
    min_agreement: float  # worst fraction of original tokens whose group matches
    size_error: float | None  # max |size difference| of matching groups, when the graph exposes sizes
    required: float = 1.0  # the min_agreement that passes: 1 (identical groups) unless a quantized artifact's budget
    same_source: int | None = None  # samples whose restore source map is identical (None: the grid is not restored)

    @property
    def ok(self) -> bool:
        sizes = self.size_error is None or self.size_error <= 1e-3 or self.required < 1
        source = self.same_source is None or self.same_source == self.samples or self.required < 1
        return self.min_agreement >= self.required and sizes and source


@dataclass
class StagedCheck:
    """One check of a staged artifact: a routing mode, or a bucket at a forced edge count."""

    label: str
    samples: int
    relative: float  # worst output error relative to the output scale, valid tokens only
    same_kept: int | None  # samples whose kept tokens match at every site (None: not compared)
    ok: bool
    required: float = 1.0  # kept-token agreement that counts as a match: 1 (the same set) unless quantized

    @property
    def passed(self) -> bool:
        return self.ok and (self.same_kept is None or self.same_kept == self.samples)


@dataclass
class ParityReport:
    tolerance: float
    batch: int
    provider: list[str]
    outputs: list[OutputParity] = field(default_factory=list)
    sites: list[SiteParity] = field(default_factory=list)
    golden: str | None = None
    replay: str | None = None
    checks: list[StagedCheck] = field(default_factory=list)
    reference: str = "eager PyTorch"  # or the recorded golden outputs (replay_golden)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs) and all(s.ok for s in self.sites) and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        for s, d in zip(self.sites, data["sites"], strict=True):
            d["ok"] = s.ok
        return data

    def text(self) -> str:
        lines = [
            f"parity: {'PASS' if self.ok else 'FAIL'} ({self.reference} vs the graph on {self.provider}, "
            f"batch {self.batch}, tolerance {self.tolerance:g} of output scale)"
        ]
        for o in self.outputs:
            lines.append(
                f"  output {o.name:<20} max|diff| {o.max_abs:.3e}  scale {o.scale:.3e}  "
                f"relative {o.relative:.3e}  {'ok' if o.ok else 'FAIL'}"
            )
        for s in self.sites:
            sizes = "" if s.size_error is None else f", sizes within {s.size_error:.1e}"
            sizes += "" if s.same_source is None else f", same source map {s.same_source}/{s.samples}"
            lines.append(
                f"  site   {s.block:<20} {s.method:<8} same token groups in {s.same_groups}/{s.samples} samples "
                f"(same order {s.same_order}/{s.samples}, min agreement {s.min_agreement:.3f}{sizes})  "
                f"{'ok' if s.ok else 'FAIL'}"
            )
        for c in self.checks:
            agree = "same kept tokens" if c.required >= 1 else f"kept tokens agree >= {c.required:g}"
            kept = "" if c.same_kept is None else f", {agree} in {c.same_kept}/{c.samples}"
            lines.append(f"  staged {c.label:<40} relative {c.relative:.3e}{kept}  {'ok' if c.passed else 'FAIL'}")
        if self.golden:
            lines.append(f"  golden files: {self.golden}")
        if self.replay:
            lines.append(f"  replay on TensorRT: {self.replay}")
        return "\n".join(lines)


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


def budget(artifact, tolerance: float | None) -> tuple[float, float]:
    """``(output tolerance, required site agreement)``: exact parity (1e-4 of the output scale, identical groups)
    unless the artifact is quantized, whose manifest records its drift budget; an explicit ``tolerance`` wins."""
    quantization = artifact.manifest.quantization
    if quantization is None:
        return (1e-4 if tolerance is None else tolerance), 1.0
    return (quantization["tolerance"] if tolerance is None else tolerance), quantization["min_agreement"]


def write_golden(directory: Path, write: Callable[[Path], None]) -> Path:
    """The one writer of golden files: ``write(folder)`` fills a fresh folder that then replaces ``DIR/golden`` as a
    whole (a failure leaves the old golden files as they were). Returns ``DIR/golden``."""
    with replaced_directory(directory / GOLDEN) as staging:
        write(staging)
    return directory / GOLDEN


def save_arrays(name: str, arrays: dict[str, np.ndarray]) -> Callable[[Path], None]:
    """A golden-file writer of one ``.npz`` file ``name`` holding ``arrays``."""
    return lambda folder: np.savez(folder / name, **arrays)


def read_golden(artifact, files: tuple[str, ...], read: Callable[[Path], Any]) -> Any:
    """``read(DIR/golden)`` once ``files`` are there; missing or unreadable golden files are a :class:`ParityError`
    that says how to write them."""
    golden = artifact.path / GOLDEN
    if not all((golden / name).is_file() for name in files):
        raise ParityError(
            f"{artifact.path} has no complete golden files; write them with `tokensieve parity {artifact.path}` "
            "where the eager model is available"
        )
    try:
        return read(golden)
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise ParityError(
            f"the golden files in {golden} are unreadable ({e}); rewrite them with `tokensieve parity`"
        ) from None


def output_scale(outputs) -> float:
    return max((float(np.abs(np.asarray(value)).max()) for value in outputs), default=1.0) or 1.0
