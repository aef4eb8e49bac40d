"""File helpers shared by the deployment bundles."""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

from tokensieve.artifact.store import ENGINES


def artifact_files(artifact, leave_out: Collection[str] = ()) -> list[Path]:
    """Everything of the artifact a bundle carries: not engines/ (they belong to one device and TensorRT version),
    not hidden temporary folders, and not the top-level folders named in ``leave_out``."""
    files = []
    for path in sorted(artifact.path.rglob("*")):
        parts = path.relative_to(artifact.path).parts
        if path.is_file() and parts[0] not in leave_out and not any(p == ENGINES or p.startswith(".") for p in parts):
            files.append(path)
    return files


def copy_artifact(artifact, folder: Path, leave_out: Collection[str] = ()) -> None:
    """Copy :func:`artifact_files` into ``folder``, keeping the layout: the copy is the artifact again. Copied, never
    hard-linked: onnx_ir refuses to read external data (``weights.data``) that has more than one link."""
    for path in artifact_files(artifact, leave_out):
        target = folder / path.relative_to(artifact.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
