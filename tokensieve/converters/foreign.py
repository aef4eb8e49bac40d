"""ONNX files exported by other tools (``optimum-cli export onnx``, ``torch.onnx.export`` with ``dynamic_axes``):
symbolic image axes pinned to a size, the input normalisation and the eager checkpoint found beside the file.

Exporters leave the model's ``config.json`` and ``preprocessor_config.json`` beside ``model.onnx``. From them:

* the image size, when the graph's height and width are symbolic (``--img-size`` wins; then the processor's
  ``crop_size`` / ``size`` {height, width} or {shortest_edge}; then the config's ``image_size``). A graph whose token
  count follows the image size cannot have its tokens reduced with static shapes until the size is fixed;
* the normalisation (``image_mean`` / ``image_std``), so ``tokensieve bench`` / ``eval`` feed what the model expects;
* the checkpoint: a folder with ``config.json`` and weights (``model.safetensors``, ``pytorch_model.bin``) is the eager
  model the file came from, which parity takes as its reference (``hf:FOLDER``) unless ``--reference`` says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokensieve.errors import SourceError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Beside:
    """What the files beside an ONNX model say."""

    size: tuple[int, int] | None
    mean: list[float] | None
    std: list[float] | None
    checkpoint: str | None  # ``hf:FOLDER`` when the folder holds a loadable checkpoint


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} beside the ONNX file is unreadable ({e}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, dict):
        if isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
            return value["height"], value["width"]
        if isinstance(value.get("shortest_edge"), int):
            return value["shortest_edge"], value["shortest_edge"]
    return None


def read_beside(onnx_path: str | Path) -> Beside:
    """The image size, normalisation and checkpoint the exporter's files beside ``onnx_path`` record."""
    folder = Path(onnx_path).resolve().parent
    processor, config = _json(folder / "preprocessor_config.json"), _json(folder / "config.json")
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else config
    size = _size(processor.get("crop_size")) or _size(processor.get("size")) or _size(vision.get("image_size"))
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std)):
        mean = std = None
    loadable = config.get("model_type") and any((folder / name).is_file() for name in WEIGHT_FILES)
    return Beside(size, mean, std, f"hf:{folder}" if loadable else None)


def pin_image_axes(shape: list[Any], img_size: int | None, beside: Beside, where: str) -> list[Any] | None:
    """``[B, C, H, W]`` with symbolic ``H`` / ``W`` fixed (``None`` when both are static already); the batch axis
    stays as it is."""
    if len(shape) != 4 or all(isinstance(d, int) for d in shape[2:]):
        return None
    size = (img_size, img_size) if img_size else beside.size
    if size is None:
        raise SourceError(
            f"{where} takes images of any size (height and width are symbolic: {shape[2]}, {shape[3]}); token "
            "reduction needs a fixed token count: pass --img-size N, or keep the exporter's preprocessor_config.json "
            "beside the file"
        )
    fixed = [shape[2] if isinstance(shape[2], int) else size[0], shape[3] if isinstance(shape[3], int) else size[1]]
    if not isinstance(shape[1], int):
        raise SourceError(f"{where} has a symbolic channel axis ({shape[1]}); export it with a fixed channel count")
    return [shape[0], shape[1], *fixed]
