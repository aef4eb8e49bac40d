"""The typed manifest: one dataclass per artifact kind, one writer (:func:`dump`) and one reader (:func:`read`).

``manifest.json`` format version 2 names the kind (``"image"``, ``"staged"``, ``"mllm"``); version 1 manifests
(before the kind was recorded for image models) read as ``"staged"`` when they hold a ``stages`` table and as
``"image"`` otherwise, so artifacts and golden files written by earlier releases load unchanged. Keys this release
does not know are kept (``extra``) and written back, so a newer minor field survives a ``quantize`` copy.

The nested tables (``stages``, ``decoder``, ``host``, ``io``...) stay plain JSON objects: each is owned by one part
of the package and documented there (:mod:`tokensieve.exporter.staged`, :mod:`tokensieve.exporter.mllm`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from tokensieve.errors import ArtifactError

FORMAT = "tokensieve-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
WEIGHTS = "weights.data"  # every graph of an artifact keeps its large initializers in this one file


@dataclass(kw_only=True)
class Manifest:
    """What every artifact records: its source, methods, graph files, export settings and file digests."""

    kind: ClassVar[str]
    source: dict[str, Any]
    graphs: dict[str, str]
    methods: list[dict[str, Any]] = field(default_factory=list)
    method_text: str = "none"
    export: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    versions: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, Any] | None = field(default=None, metadata={"omit_none": True})  # INT8 copies only
    files: dict[str, str] | None = None  # SHA-256 of every file written with the manifest (set by dump)
    format_version: int = FORMAT_VERSION  # the version the file was written with (dump writes the current one)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this release does not know, kept as they were

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``manifest.json`` holds (current format version)."""
        data = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "extra" and not (f.metadata.get("omit_none") and getattr(self, f.name) is None)
        }
        data.update(format=FORMAT, format_version=FORMAT_VERSION, kind=self.kind)
        return {**self.extra, **json.loads(json.dumps(data))}

    def replace(self, **changes: Any) -> Manifest:
        """A deep copy with ``changes`` applied (the copy shares no table with this manifest)."""
        return read_dict({**self.to_dict(), **changes}, "<copy>")


@dataclass(kw_only=True)
class ImageManifest(Manifest):
    """One image model (``model.onnx``; ``baseline.onnx`` beside it when a method reduces tokens)."""

    kind: ClassVar[str] = "image"
    preprocessing: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    layout: dict[str, Any] | None = None
    locate_error: str | None = None
    tokens_per_block: dict[str, Any] = field(default_factory=dict)
    sites: list[dict[str, Any]] = field(default_factory=list)
    macs: dict[str, Any] = field(default_factory=dict)
    lint: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class StagedManifest(ImageManifest):
    """An adaptive method's bucket graphs: ``stages`` holds the sites, buckets per route, graphs and calibration."""

    kind: ClassVar[str] = "staged"
    stages: dict[str, Any]


@dataclass(kw_only=True)
class MllmManifest(Manifest):
    """An MLLM split into vision, embed, prefill (or segments) and decode graphs."""

    kind: ClassVar[str] = "mllm"
    architecture: str = ""
    dynamic: dict[str, str] = field(default_factory=dict)
    io: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, Any] = field(default_factory=dict)
    vision: dict[str, Any] | None = None
    image_tokens: dict[str, Any] = field(default_factory=dict)
    sites: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "tokenizer/tokenizer.json"
    lint_target: str = "trt10.3"
    lint: dict[str, Any] = field(default_factory=dict)


KINDS: dict[str, type[Manifest]] = {cls.kind: cls for cls in (ImageManifest, StagedManifest, MllmManifest)}


def read_dict(data: Any, where: str) -> Manifest:
    """The typed manifest of a parsed ``manifest.json`` (format version 1 or 2)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"{where} is not a tokensieve manifest")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{where} has format version {version}, newer than this tokensieve reads ({FORMAT_VERSION}); upgrade "
            "tokensieve"
        )
    if not isinstance(data.get("graphs"), dict):
        raise ArtifactError(f'{where} names no graphs (no "graphs" table); re-export the artifact')
    kind = data.get("kind")
    if kind in (None, "vit"):  # version 1 wrote no kind for image models
        kind = "staged" if "stages" in data else "image"
    if kind not in KINDS:
        raise ArtifactError(f"{where} has an unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
    cls = KINDS[kind]
    known = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
    missing = [f.name for f in dataclasses.fields(cls) if f.name in known and _required(f) and f.name not in data]
    if missing:
        raise ArtifactError(f"{where} lacks {', '.join(missing)}; re-export the artifact")
    extra = {k: v for k, v in data.items() if k not in known and k not in ("format", "kind")}
    return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def read(directory: Path) -> Manifest:
    """The manifest of the artifact at ``directory`` (typed errors for a missing, unparsable or foreign file)."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{directory} is not a tokensieve artifact (no {MANIFEST}); create one with `tokensieve export`"
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    return read_dict(data, str(path))


def dump(directory: Path, manifest: Manifest, files: dict[str, str]) -> None:
    """Write ``manifest.json`` into ``directory`` with the digests ``files`` of everything written beside it."""
    manifest.files = files
    (directory / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
