"""File helpers shared by the deployment bundles."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tokensieve.artifact.store import ENGINES


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (weights and plans are large), copying when the file system cannot."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def artifact_files(artifact) -> list[Path]:
    """Everything of the artifact a bundle carries: not engines/ (they belong to one device and TensorRT version)
    and not hidden temporary folders."""
    return [
        p
        for p in sorted(artifact.path.rglob("*"))
        if p.is_file()
        and not any(part == ENGINES or part.startswith(".") for part in p.relative_to(artifact.path).parts)
    ]


def copy_artifact(artifact, folder: Path) -> None:
    """Link (or copy) :func:`artifact_files` into ``folder``, keeping the layout: the copy is the artifact again."""
    for path in artifact_files(artifact):
        target = folder / path.relative_to(artifact.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, target)
