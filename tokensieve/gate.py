"""Registry gate: decide, without torch, whether artifacts may be published (``tokensieve gate``).

Each artifact gets these checks; a policy (JSON, see :class:`Policy`) sets the target and the budgets:

* ``files``: every file the export wrote is present and has the SHA-256 the manifest recorded (nothing was
  edited, truncated or swapped since export);
* ``lint``: every deployable graph is lint-clean for the policy's TensorRT target, re-linted now rather than read
  from the manifest;
* ``parity``: the golden files ``tokensieve parity`` wrote are replayed on ONNX Runtime (values *and* kept
  tokens / positions, every routing mode and bucket edge of a staged artifact, :meth:`Artifact.replay`); missing
  golden files fail unless ``require_golden`` is false;
* budgets, only those the policy sets: ``methods`` (allowed method names), ``max_opset``, ``min_limit_speedup``
  and ``max_macs`` (image models: the manifest's MAC count, the bucketed expectation for staged artifacts),
  ``min_fraction_of_limit`` (the speedup ``tokensieve bench`` measured, as a fraction of the MAC limit, at every
  batch in ``bench.json``), ``max_cache_slots`` (MLLMs: the fixed decode graph's KV-cache capacity), and the
  quality budgets ``min_agreement`` and ``max_accuracy_drop``, read from the ``eval.json`` that ``tokensieve eval``
  wrote next to the artifact (agreement with the unreduced model; accuracy drop against the labels or answers).

A check passes, fails, or is skipped with the reason (a check that does not apply to the artifact's kind). The
report prints as text, JSON or JUnit XML (one test suite per artifact, one test case per check), which CI
systems display natively. Paths may be artifact directories or registry folders searched for artifacts.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from tokensieve.artifact.store import MANIFEST, Artifact, file_digests
from tokensieve.errors import ArtifactError, GateError, TokensieveError, read_json
from tokensieve.graph_passes.lint import TARGETS
from tokensieve.methods import REGISTRY
from tokensieve.parity.by_kind import replay

PASS, FAIL, SKIP = "pass", "fail", "skip"


def _non_negative(value: Any) -> bool:
    return isinstance(value, (int, float)) and value >= 0


@dataclass(frozen=True)
class Policy:
    """What an artifact must satisfy. Unset budgets are not checked."""

    target: str = "trt10.3"
    require_golden: bool = True
    tolerance: float | None = None  # of the output scale; None: 1e-4, or a quantized artifact's recorded budget
    methods: tuple[str, ...] | None = None
    max_opset: int | None = None
    min_limit_speedup: float | None = None
    max_macs: float | None = None
    min_fraction_of_limit: float | None = None
    max_cache_slots: int | None = None
    min_agreement: float | None = None  # eval.json: agreement with the unreduced model (0..1)
    max_accuracy_drop: float | None = None  # eval.json: baseline accuracy minus the artifact's

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or self.target not in TARGETS:
            raise GateError(f"lint target {self.target!r} is unknown; choose one of {', '.join(TARGETS)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise GateError(f"unknown policy key(s) {unknown}; valid keys: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "methods":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise GateError(f"policy key 'methods' must be a list of method names, got {value!r}")
                unknown = sorted(set(value) - set(REGISTRY))
                if unknown:
                    raise GateError(
                        f"policy key 'methods' names unknown method(s) {unknown}; known: {', '.join(sorted(REGISTRY))}"
                    )
                value = tuple(value)
            elif key == "require_golden":
                if not isinstance(value, bool):
                    raise GateError(f"policy key 'require_golden' must be true or false, got {value!r}")
            elif key != "target" and value is not None and (isinstance(value, bool) or not _non_negative(value)):
                raise GateError(f"policy key {key!r} must be a non-negative number, got {value!r}")
            values[key] = value
        return cls(**values)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        data = read_json(path, GateError, "the policy file")
        if not isinstance(data, dict):
            raise GateError(f"the policy file {path} must hold a JSON object of policy keys")
        return cls.from_dict(data)


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    detail: str


@dataclass
class ArtifactGate:
    path: str
    description: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)


@dataclass
class GateReport:
    policy: Policy
    artifacts: list[ArtifactGate]

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.artifacts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "policy": asdict(self.policy),
            "artifacts": [{**asdict(a), "ok": a.ok} for a in self.artifacts],
        }

    def text(self) -> str:
        lines = []
        for a in self.artifacts:
            lines.append(f"{'PASS' if a.ok else 'FAIL'}  {a.path}  ({a.description})")
            lines += [f"  {c.status:<4}  {c.name:<22} {c.detail}" for c in a.checks]
        failed = sum(not a.ok for a in self.artifacts)
        lines.append(
            f"gate {'PASSED' if self.ok else 'FAILED'}: {len(self.artifacts) - failed} of {len(self.artifacts)} "
            f"artifact(s) pass (target {self.policy.target})"
        )
        return "\n".join(lines)

    def junit(self) -> str:
        """JUnit XML: one ``testsuite`` per artifact, one ``testcase`` per check."""
        suites = ElementTree.Element("testsuites", name="tokensieve gate")
        for a in self.artifacts:
            suite = ElementTree.SubElement(
                suites,
                "testsuite",
                name=a.path,
                tests=str(len(a.checks)),
                failures=str(sum(c.status == FAIL for c in a.checks)),
                skipped=str(sum(c.status == SKIP for c in a.checks)),
            )
            for c in a.checks:
                case = ElementTree.SubElement(suite, "testcase", classname=a.path, name=c.name)
                if c.status == FAIL:
                    ElementTree.SubElement(case, "failure", message=c.detail)
                elif c.status == SKIP:
                    ElementTree.SubElement(case, "skipped", message=c.detail)
        ElementTree.indent(suites)
        return ElementTree.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def find_artifacts(paths: list[str | os.PathLike]) -> list[Path]:
    """Artifact directories: each path itself when it holds a manifest, else every artifact below it."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / MANIFEST).is_file():
            found.append(path)
        elif path.is_dir():
            below = sorted(p.parent for p in path.rglob(MANIFEST) if not p.parent.name.startswith("."))
            if not below:
                raise GateError(f"no tokensieve artifact (no {MANIFEST}) in {path}")
            found += below
        else:
            raise GateError(f"{path} does not exist; pass artifact directories or a registry folder")
    return found


def _files(artifact: Artifact) -> Check:
    recorded = artifact.manifest.files
    if not recorded:
        return Check("files", FAIL, "the manifest records no file digests; re-export with this tokensieve version")
    current = file_digests(artifact.path, recorded)
    missing = sorted(set(recorded) - set(current))
    changed = sorted(name for name in recorded if name in current and current[name] != recorded[name])
    if missing or changed:
        parts = [f"missing {missing}" if missing else "", f"changed since export {changed}" if changed else ""]
        return Check("files", FAIL, "; ".join(p for p in parts if p))
    return Check("files", PASS, f"{len(recorded)} files match their export digests")


def _lint(artifact: Artifact, target: str) -> Check:
    report = artifact.lint(target)
    errors = report.errors
    if errors:
        shown = "; ".join(f"{f.node}: {f.message}" for f in errors[:3])
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        return Check(f"lint {target}", FAIL, f"{len(errors)} error(s): {shown}{more}")
    graphs = len(artifact.graph_files())
    return Check(f"lint {target}", PASS, f"{graphs} graph(s) clean ({len(report.findings)} warning(s))")


def _parity(artifact: Artifact, policy: Policy) -> Check:
    if not (artifact.path / "golden").is_dir():
        status = FAIL if policy.require_golden else SKIP
        return Check("parity", status, f"no golden files; run `tokensieve parity {artifact.path}` before publishing")
    report = replay(artifact, **({} if policy.tolerance is None else {"tolerance": policy.tolerance}))
    if artifact.kind == "mllm":
        bad = [c for c in report.cases if not c.ok(report.tolerance)]
        summary = f"{len(report.cases) - len(bad)}/{len(report.cases)} recorded cases reproduced"
        worst = max(c.logits_error for c in report.cases)
        return Check("parity", PASS if report.ok else FAIL, f"{summary} (ids, kept positions; logits {worst:.1e})")
    if report.checks:  # staged: routing modes and bucket edge counts
        passed = sum(c.passed for c in report.checks)
        detail = f"{passed}/{len(report.checks)} recorded staged checks reproduced (outputs and kept tokens)"
        return Check("parity", PASS if report.ok else FAIL, detail)
    worst = max(o.relative for o in report.outputs)
    sites = sum(s.ok for s in report.sites)
    detail = f"outputs within {worst:.1e} of scale, {sites}/{len(report.sites)} sites keep the recorded tokens"
    return Check("parity", PASS if report.ok else FAIL, detail)


def _bound(name: str, value: float | None, limit: float | None, at_most: bool, unit: str = "") -> Check | None:
    """``value <= limit`` (``at_most``) or ``value >= limit``; None when the policy sets no limit."""
    if limit is None:
        return None
    if value is None:
        return Check(name, SKIP, "not recorded for this kind of artifact")
    ok = value <= limit if at_most else value >= limit
    relation = ("<=" if ok else ">") if at_most else (">=" if ok else "<")
    return Check(name, PASS if ok else FAIL, f"{value:g}{unit} {relation} {limit:g}{unit}")


def _measured_fraction(artifact: Artifact, limit: float | None) -> Check | None:
    if limit is None:
        return None
    if artifact.kind == "mllm":
        return Check("fraction_of_limit", SKIP, "MLLM benchmarks have no MAC limit")
    try:
        rows = json.loads((artifact.path / "bench.json").read_text())["rows"]
        fractions = {row["batch"]: row["fraction_of_limit"] for row in rows if "batch" in row}
    except (OSError, ValueError, KeyError, TypeError):
        return Check("fraction_of_limit", FAIL, f"no readable bench.json; run `tokensieve bench {artifact.path}`")
    if not fractions:
        return Check("fraction_of_limit", FAIL, "bench.json has no per-batch rows")
    worst = min(fractions, key=fractions.get)
    ok = fractions[worst] >= limit
    detail = ", ".join(f"batch {b}: {f:.3f}" for b, f in sorted(fractions.items()))
    return Check("fraction_of_limit", PASS if ok else FAIL, f"{detail} ({'>=' if ok else '<'} {limit:g})")


def _quality(artifact: Artifact, policy: Policy) -> list[Check]:
    """The quality budgets, from the ``eval.json`` committed next to the artifact (torch-free: only JSON is read)."""
    budgets = {"min_agreement": policy.min_agreement, "max_accuracy_drop": policy.max_accuracy_drop}
    if all(limit is None for limit in budgets.values()):
        return []
    try:
        report = json.loads((artifact.path / "eval.json").read_text())
        values = {"min_agreement": report["agreement"], "max_accuracy_drop": report.get("accuracy_drop")}
    except (OSError, ValueError, KeyError, TypeError):
        missing = f"no readable eval.json; run `tokensieve eval {artifact.path} --data DATA` and commit eval.json"
        return [Check(name, FAIL, missing) for name, limit in budgets.items() if limit is not None]
    checks = []
    for name, limit in budgets.items():
        if limit is None:
            continue
        if values[name] is None:
            checks.append(Check(name, FAIL, "eval.json has no accuracy: evaluate on labelled data (or answers)"))
            continue
        checks.append(_bound(name, values[name], limit, at_most=name.startswith("max")))
    return checks


def _budgets(artifact: Artifact, policy: Policy) -> list[Check]:
    manifest = artifact.manifest
    checks: list[Check | None] = []
    if policy.methods is not None:
        used = [m["name"] for m in manifest.methods]
        outside = sorted(set(used) - set(policy.methods))
        detail = f"uses {used or 'no method'}" + (f"; not allowed: {outside}" if outside else "")
        checks.append(Check("methods", FAIL if outside else PASS, detail))
    checks.append(_bound("max_opset", manifest.export.get("opset"), policy.max_opset, at_most=True))
    macs = manifest.macs if artifact.kind != "mllm" else {}
    model = macs.get("expected") or macs.get("model")  # staged: the mean over the calibration data, bucketed
    limit = round(macs["baseline"] / model, 4) if model else None
    checks.append(_bound("min_limit_speedup", limit, policy.min_limit_speedup, at_most=False, unit="x"))
    checks.append(_bound("max_macs", model, policy.max_macs, at_most=True))
    checks.append(_measured_fraction(artifact, policy.min_fraction_of_limit))
    capacity = manifest.decoder.get("capacity") if artifact.kind == "mllm" else None
    checks.append(_bound("max_cache_slots", capacity, policy.max_cache_slots, at_most=True))
    return [c for c in checks if c is not None] + _quality(artifact, policy)


def _guarded(name: str, check, *args) -> Check:
    """Run one check; a graph or golden file that cannot even be read fails this check of this artifact (with the
    reader's first line), not the whole gate."""
    try:
        return check(*args)
    except TokensieveError as e:
        return Check(name, FAIL, str(e))
    except Exception as e:  # onnx / protobuf / ONNX Runtime errors on a damaged file
        return Check(name, FAIL, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


def gate_artifact(path: Path, policy: Policy) -> ArtifactGate:
    try:
        artifact = Artifact.load(path)
    except ArtifactError as e:
        return ArtifactGate(str(path), "unreadable", [Check("manifest", FAIL, str(e))])
    manifest = artifact.manifest
    source = manifest.source
    description = f"{source['kind']}:{source['name']}, {manifest.method_text or 'none'}"
    checks = [
        _guarded("files", _files, artifact),
        _guarded(f"lint {policy.target}", _lint, artifact, policy.target),
        _guarded("parity", _parity, artifact, policy),
    ]
    return ArtifactGate(str(path), description, checks + _budgets(artifact, policy))


def gate(paths: list[str | os.PathLike], policy: Policy | None = None) -> GateReport:
    """Gate every artifact in ``paths`` (artifact directories or registry folders) against ``policy``."""
    policy = policy or Policy()
    return GateReport(policy, [gate_artifact(path, policy) for path in find_artifacts(paths)])
