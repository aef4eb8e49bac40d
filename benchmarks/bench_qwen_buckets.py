"""What resizing to a resolution bucket costs Qwen2.5-VL's vision side: features at the image's native grid (the
processor's own resize, run on the dynamic-patch-count graph) vs after resizing to the nearest bucket of a bucket
set (run on that bucket's static graph), on crops of real photos of several native sizes.

Per image: the native and the bucket grid, their image-token counts and vision MACs, the cosine similarity of the
mean-pooled image features, and of the language model's next-token logits after a prompt holding the image
(the Hugging Face model with its mRoPE positions, greedy top-1 agreement too). The nearest bucket is the one closest
in aspect ratio, then in patch count (``runtimes/qwen_vision.py``).

Random weights (``hf:qwen2.5-vl-small``: the real patch, merge and window geometry, narrow widths, seeded
realistic initialisation): the numbers say how much the bucket resize perturbs this network's function, not how a
trained Qwen2.5-VL's answers change; run it on a checkpoint directory for that. Writes
``benchmarks/results/qwen_buckets.json`` and ``qwen_buckets.png``.

    python benchmarks/bench_qwen_buckets.py [--source hf:qwen2.5-vl-small] [--buckets 16x24 24x16 20x20 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from tokensieve.bench.image import pyplot, save_figure
from tokensieve.converters.qwen_vision import build_qwen_vl
from tokensieve.converters.qwen_vl import vision_geometry
from tokensieve.exporter.qwen_vision import export_qwen_vision
from tokensieve.runtimes.mrope import token_types
from tokensieve.runtimes.qwen_image import patch_grid, preprocess
from tokensieve.runtimes.qwen_vision import QwenVision, tower_macs

RESULTS = Path(__file__).parent / "results"
BUCKETS = ["16x24", "24x16", "20x20", "24x32", "32x24", "28x28", "16x32", "32x16"]
CROPS = [
    (512, 600),
    (512, 400),
    (300, 600),
    (512, 300),
    (256, 256),
    (440, 440),
    (200, 500),
    (512, 160),
]  # width, height


def photos() -> list[tuple[str, np.ndarray]]:
    """Crops (width x height) of matplotlib's bundled photo, then the repository's 160 px benchmark photos."""
    import matplotlib.cbook as cbook
    from PIL import Image

    hopper = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    images = []
    for width, height in CROPS:
        left, top = (hopper.width - width) // 2, (hopper.height - height) // 2
        images.append((f"hopper {width}x{height}", np.asarray(hopper.crop((left, top, left + width, top + height)))))
    for path in sorted((Path(__file__).parent / "data" / "photos").glob("*.jpg"))[:3]:
        images.append((f"{path.stem} 160x160", np.asarray(Image.open(path).convert("RGB"))))
    return images


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def next_token_logits(model, host: dict, pixels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The model's logits after ``text <|vision_start|> image <|vision_end|> text`` (pixels through its tower)."""
    config = model.config
    image = [config.image_token_id] * (grid[0] * grid[1] // host["merge_size"] ** 2)
    ids = [5, 6, 7, config.vision_start_token_id, *image, config.vision_end_token_id, 8, 9]
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([ids]),
            mm_token_type_ids=torch.from_numpy(token_types(ids, host))[None],
            pixel_values=torch.from_numpy(pixels),
            image_grid_thw=torch.tensor([[1, *grid]]),
        )
    return out.logits[0, -1].numpy()


def measure(vision: QwenVision, model, host: dict, name: str, image: np.ndarray) -> dict:
    native = patch_grid(image.shape[:2], host)[1:]
    bucket = vision.nearest_bucket(native)
    pixels = {grid: preprocess(image, host, grid=grid)[0] for grid in (native, bucket)}
    pooled = {grid: vision.features(p, grid).mean(axis=0) for grid, p in pixels.items()}
    logits = {grid: next_token_logits(model, host, p, grid) for grid, p in pixels.items()}
    geometry = vision_geometry(model.config)
    return {
        "image": name,
        "size_hw": list(image.shape[:2]),
        "native_grid": list(native),
        "bucket_grid": list(bucket),
        "native_tokens": native[0] * native[1] // 4,
        "bucket_tokens": bucket[0] * bucket[1] // 4,
        "native_gmacs": tower_macs(geometry, *native) / 1e9,
        "bucket_gmacs": tower_macs(geometry, *bucket) / 1e9,
        "pooled_cosine": cosine(pooled[native], pooled[bucket]),
        "logits_cosine": cosine(logits[native], logits[bucket]),
        "top1_agrees": bool(logits[native].argmax() == logits[bucket].argmax()),
    }


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["pooled_cosine"] for r in rows], 0.4, label="pooled image features")
    ax.bar(x + 0.2, [r["logits_cosine"] for r in rows], 0.4, label="next-token logits")
    labels = [f"{r['image']}\n{r['native_grid'][0]}x{r['native_grid'][1]}->{r['bucket_grid'][0]}x{r['bucket_grid'][1]}"
              for r in rows]  # fmt: skip
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=6)
    low = min(min(r["pooled_cosine"], r["logits_cosine"]) for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_ylabel("cosine, bucket vs native grid")
    ax.set_title("Qwen2.5-VL (random weights): nearest-bucket resize", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="hf:qwen2.5-vl-small")
    parser.add_argument("--buckets", nargs="+", default=BUCKETS, help="rows x columns of patches")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    buckets = [tuple(int(v) for v in b.split("x")) for b in args.buckets]
    torch.set_num_threads(2)
    model, host = build_qwen_vl(args.source.removeprefix("hf:"), args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        description = export_qwen_vision(args.source, buckets, Path(tmp) / "vision", seed=args.seed)
        vision = QwenVision.from_export(Path(tmp) / "vision", threads=2)
        rows = [measure(vision, model, host, name, image) for name, image in photos()]
    for r in rows:
        print(f"{r['image']:>20} {r['native_grid']} -> {r['bucket_grid']}  pooled {r['pooled_cosine']:.4f}  "
              f"logits {r['logits_cosine']:.4f}  top-1 {'=' if r['top1_agrees'] else '!'}")  # fmt: skip
    report = {
        "source": args.source,
        "seed": args.seed,
        "buckets": [list(b) for b in buckets],
        "weights": "random (seeded); not a trained model's accuracy",
        "parity": description["parity"],
        "images": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qwen_buckets.json").write_text(json.dumps(report, indent=1))
    plot(rows, RESULTS / "qwen_buckets.png")


if __name__ == "__main__":
    main()
