"""Evaluation data: image folders, ImageFolder trees (labels) and JSONL prompt files, read and checked up front so a
bad file stops an evaluation before anything runs (the error names the file or line and the fix).

* a folder of images (searched recursively when it has no class folders): no labels;
* an ImageFolder tree, ``DATA/<class>/<image>``: the folder name is the label. Folders named by integers are class
  indices; otherwise there must be one folder per class of the classifier, in sorted order (``torchvision``'s
  ``ImageFolder`` rule);
* an ``.npz`` of model-ready batches (:func:`tokensieve.calibration.data.load_calibration`): no labels;
* a JSONL file of ``{"image": PATH, "prompt": TEXT, "answer": TEXT, "continuation": TEXT}`` lines for MLLMs
  (``image`` relative to the JSONL file; ``answer`` and ``continuation`` optional; a long text prompt without an
  image and with a ``continuation`` measures a KV-cache method's perplexity).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokensieve.calibration.data import IMAGE_SUFFIXES, load_calibration, preprocess
from tokensieve.errors import DataError


@dataclass
class ImageSet:
    """The images of an evaluation, in order, and their class folder names (None: no labels)."""

    files: list[Path]
    labels: list[str] | None = None
    arrays: np.ndarray | None = None  # model-ready inputs from an .npz (then ``files`` is empty)

    def __len__(self) -> int:
        return len(self.files) if self.arrays is None else len(self.arrays)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_set(path: str | os.PathLike, preprocessing: dict, limit: int | None = None) -> ImageSet:
    """The images under ``path`` (at most ``limit``; an ImageFolder tree keeps the first of every class in turn)."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        try:
            arrays = load_calibration(path, preprocessing["shape"], preprocessing["mean"], preprocessing["std"])
        except Exception as e:
            raise DataError(str(e)) from None
        return ImageSet([], None, arrays[:limit])
    if not path.is_dir():
        raise DataError(f"evaluation data {path} must be a folder of images, an ImageFolder tree or an .npz file")
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    top = _images(path)
    if classes and top:
        raise DataError(
            f"{path} holds both images ({top[0].name}, ...) and class folders ({classes[0].name}, ...); put every "
            "image in a class folder (labels) or use a folder without class folders (no labels)"
        )
    if not classes:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); give a folder of images")
        return ImageSet(files[:limit])
    per_class = {c.name: _images(c) for c in classes}
    empty = [name for name, files in per_class.items() if not files]
    if empty:
        raise DataError(f"class folder {path / empty[0]} has no images; remove it or add its images")
    pairs: list[tuple[str, Path]] = []
    for rank in range(max(map(len, per_class.values()))):
        pairs += [(name, files[rank]) for name, files in per_class.items() if rank < len(files)]
    pairs = pairs[:limit]
    return ImageSet([f for _, f in pairs], [name for name, _ in pairs])


def class_indices(labels: Sequence[str], classes: int) -> np.ndarray:
    """The classifier's class index of every label (see the module docstring for the rule)."""
    names = sorted(set(labels))
    if all(name.isdigit() for name in names):
        outside = [name for name in names if int(name) >= classes]
        if outside:
            raise DataError(
                f"class folder {outside[0]!r} names a class index outside the classifier's 0..{classes - 1}; "
                "name the folders by the classifier's class indices"
            )
        return np.asarray([int(label) for label in labels])
    if len(names) != classes:
        raise DataError(
            f"{len(names)} class folders ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) do not match the "
            f"classifier's {classes} classes: name the folders by class index (0..{classes - 1}) or give one folder "
            "per class (sorted folder order = class index)"
        )
    rank = {name: i for i, name in enumerate(names)}
    return np.asarray([rank[label] for label in labels])


def load_pixels(images: ImageSet, start: int, stop: int, preprocessing: dict) -> np.ndarray:
    """``[stop - start, C, H, W]`` model-ready inputs; an unreadable image is a :class:`DataError` naming it."""
    if images.arrays is not None:
        return images.arrays[start:stop]
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for file in images.files[start:stop]:
        try:
            with Image.open(file) as image:
                arrays.append(preprocess(image, preprocessing["shape"], preprocessing["mean"], preprocessing["std"]))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"image {file} cannot be read ({e}); remove it or replace it with a valid image") from None
    return np.stack(arrays)


@dataclass
class PromptCase:
    """One JSONL line: an image (or None), a prompt, and the expected answer (or None)."""

    line: int
    image: Path | None
    prompt: str
    answer: str | None = None
    continuation: str | None = None  # a given continuation whose perplexity is measured (teacher forcing)


def _case(path: Path, number: int, text: str) -> PromptCase:
    where = f"{path} line {number}"
    try:
        record = json.loads(text)
    except ValueError as e:
        raise DataError(f"{where} is not valid JSON ({e}); each line holds one JSON object") from None
    if not isinstance(record, dict):
        raise DataError(f'{where} is not a JSON object; write {{"image": ..., "prompt": ..., "answer": ...}}')
    if not isinstance(record.get("prompt"), str):
        raise DataError(f'{where} has no "prompt" string; every line needs one')
    for key in ("image", "answer", "continuation"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise DataError(f'{where}: "{key}" must be a string, got {type(record[key]).__name__}')
    image = None
    if record.get("image"):
        image = (path.parent / record["image"]).resolve()
        if not image.is_file():
            raise DataError(f"{where}: image {image} does not exist; paths are relative to the JSONL file")
    return PromptCase(number, image, record["prompt"], record.get("answer"), record.get("continuation"))


def read_prompts(path: str | os.PathLike, limit: int | None = None) -> list[PromptCase]:
    """The cases of a JSONL file (blank lines skipped), every image opened once to check that it is readable."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the prompt file {path} ({e}); give a JSONL file of prompts") from None
    cases = [_case(path, n, text) for n, text in enumerate(lines, 1) if text.strip()][:limit]
    if not cases:
        raise DataError(f'{path} holds no prompts; write one {{"image": ..., "prompt": ...}} object per line')
    from PIL import Image, UnidentifiedImageError

    for case in cases:
        if case.image is not None:
            try:
                with Image.open(case.image) as image:
                    image.load()
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{path} line {case.line}: image {case.image} cannot be read ({e})") from None
    return cases
