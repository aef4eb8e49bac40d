"""Calibration inputs: a folder of images or an ``.npz`` of input batches, turned into model-ready pixel arrays.

Images are resized (shorter side to the model's resolution, bicubic), center-cropped, scaled to [0, 1] and
normalised with the model's mean/std (recorded in the manifest). For an ``.npz``, the array named like the model's
input is used, otherwise the first array; it must be ``[N, C, H, W]`` (or ``[C, H, W]``) with the model's C, H, W.

:func:`sample_images` makes "real-looking" images without any download, for tests and benchmarks: random crops,
zooms, flips and colour changes of the photographs and terrain maps that matplotlib ships as sample data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tokensieve.errors import SourceError
from tokensieve.runtimes.llava_image import eight_bit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


def preprocess(image, shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A PIL image -> ``[C, H, W]`` float32, resized, center-cropped and normalised."""
    from PIL import Image

    channels, height, width = shape
    image = eight_bit(image, "RGB" if channels == 3 else "L")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    array = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
    array = array.reshape(height, width, channels).transpose(2, 0, 1)
    return (array - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


def load_calibration(
    path: str | os.PathLike,
    shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    input_name: str = "pixel_values",
    limit: int | None = None,
) -> np.ndarray:
    """``[N, C, H, W]`` float32 calibration inputs from an image folder or an ``.npz`` file."""
    path = Path(path)
    if path.is_dir():
        from PIL import Image, UnidentifiedImageError

        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not files:
            raise SourceError(f"calibration folder {path} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        arrays = []
        for file in files:
            try:
                with Image.open(file) as image:
                    arrays.append(preprocess(image, shape, mean, std))
            except (UnidentifiedImageError, OSError) as e:
                raise SourceError(f"calibration image {file} cannot be read: {e}") from None
        return np.stack(arrays)
    if path.suffix == ".npz" and path.is_file():
        try:
            data = np.load(path)
        except (OSError, ValueError) as e:
            raise SourceError(f"calibration file {path} is not a readable .npz: {e}") from None
        if not data.files:
            raise SourceError(f"calibration file {path} holds no arrays")
        name = input_name if input_name in data.files else data.files[0]
        try:
            array = data[name]
        except ValueError as e:  # object arrays need pickle, which is never enabled for user files
            raise SourceError(f"calibration array {name!r} in {path} cannot be read without pickle: {e}") from None
        if array.dtype.kind in "iu":
            raise SourceError(
                f"calibration array {name!r} in {path} holds integers ({array.dtype}), not model-ready inputs: "
                "normalise them with the model's mean and std, or give the images as a folder"
            )
        if array.dtype.kind != "f":
            raise SourceError(
                f"calibration array {name!r} in {path} has dtype {array.dtype}; give model-ready float32 inputs"
            )
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise SourceError(f"calibration array {name!r} in {path} holds NaN or infinite values")
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != tuple(shape):
            expected = ", ".join(map(str, shape))
            raise SourceError(
                f"calibration array in {path} has shape {list(array.shape)}; the model takes [N, {expected}]"
            )
        return array[:limit]
    raise SourceError(f"calibration data {path} must be a folder of images or an .npz file")


def sample_images(count: int, seed: int = 0, size: int = 256):
    """``count`` varied, real-looking PIL images from matplotlib's bundled sample data (no download)."""
    try:
        import matplotlib.cbook as cbook
        from PIL import Image, ImageEnhance, ImageOps
    except ImportError as e:
        raise SourceError("sample_images needs matplotlib and Pillow (pip install tokensieve[bench])") from e
    rng = np.random.default_rng(seed)
    sources = [
        Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"),
        Image.open(cbook.get_sample_data("Minduka_Present_Blue_Pack.png")).convert("RGB"),
    ]
    for name, key in (("topobathy.npz", "topo"), ("jacksboro_fault_dem.npz", "elevation")):
        with cbook.get_sample_data(name) as dem:
            z = dem[key].astype(np.float32)
        z = (z - z.min()) / (z.max() - z.min() + 1e-6)
        rgb = np.stack([z, np.sqrt(z), 1 - z], axis=-1)
        sources.append(Image.fromarray((rgb * 255).astype(np.uint8)))
    images = []
    for _ in range(count):
        image = sources[rng.integers(len(sources))]
        zoom = rng.uniform(0.25, 1.0)
        w, h = max(16, int(image.width * zoom)), max(16, int(image.height * zoom))
        x, y = rng.integers(0, image.width - w + 1), rng.integers(0, image.height - h + 1)
        crop = image.crop((x, y, x + w, y + h)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.3, 1.7))
        crop = ImageEnhance.Contrast(crop).enhance(rng.uniform(0.5, 1.5))
        images.append(crop)
    return images
