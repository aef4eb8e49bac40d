"""Dense outputs under token reduction: a DPT depth model on a DINOv2 backbone, the grid restored before its four
taps (``--restore-grid``, on by default for such a model), against the unreduced model on real photos.

Per method strength: mean correlation of the depth maps with the unreduced model's, mean IoU of their top 10 %
pixels, and the MAC-limit ratio (unreduced MACs / reduced MACs, whole model: backbone, neck and head). Photos:
scikit-image's sample images (``skimage.data``, shipped inside the package). Weights: no trained dense ViT ships
with a package here (there is no model hub), so the model has tokensieve's seeded random weights with realistic
statistics; the figures say how faithfully restoration follows the unreduced model, not how a trained depth model
degrades. Give ``--source hf:/path/to/a/DPT-checkpoint`` to measure trained weights.

Writes ``benchmarks/results/dense.json`` and ``dense.png`` (``--out`` names other files).

    python benchmarks/bench_dense.py [--source hf:DIR] [--images 8] [--methods M ...] [--out NAME]

Target (issue 28): correlation >= 0.97 at a MAC cut >= 1.25x.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import numpy as np

import tokensieve
from tokensieve.bench.image import pyplot, save_figure
from tokensieve.evaluate.image import eval_image

RESULTS = Path(__file__).parent / "results"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina", "ihc")
# DPT with a DINOv2-S/14 backbone (12 blocks, width 384) at 224 px (16 x 16 patches), taps after blocks 3, 6, 9, 12
DPT_DINOV2_SMALL = {
    "model_type": "dpt",
    "image_size": 224,
    "patch_size": 14,
    "hidden_size": 384,
    "is_hybrid": False,
    "backbone_config": {
        "model_type": "dinov2",
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "mlp_ratio": 4,
        "image_size": 224,
        "patch_size": 14,
        "out_features": ["stage3", "stage6", "stage9", "stage12"],
        "reshape_hidden_states": False,
    },
    "neck_hidden_sizes": [48, 96, 192, 384],
    "reassemble_factors": [4, 2, 1, 0.5],
    "fusion_hidden_size": 64,
    "head_hidden_size": 32,
}
STRENGTHS = {
    "topk": [f"topk(keep={k}, layers=[3, 6, 9])" for k in (0.9, 0.8, 0.7, 0.6, 0.5)],
    "tome": [f"tome(r={r})" for r in (4, 8, 12, 16)],
}


def photos(folder: Path, count: int) -> Path:
    """scikit-image's sample photos as PNG files in ``folder`` (grey ones as RGB)."""
    import skimage.data
    from PIL import Image
    from skimage.util import img_as_ubyte

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS[:count]:
        image = getattr(skimage.data, name)() if hasattr(skimage.data, name) else _shipped(name)
        image = img_as_ubyte(np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3])
        Image.fromarray(image).save(folder / f"{name}.png")
    return folder


def _shipped(name: str) -> np.ndarray:
    import skimage.data
    import skimage.io

    folder = Path(skimage.data.__file__).parent
    return skimage.io.imread(next(folder.glob(f"{name}.*")))


def measure(baseline_file: Path, method: str, images: Path, work: Path) -> dict:
    artifact = tokensieve.export(baseline_file, method, work / "artifact")
    report = eval_image(artifact, images, task="dense", save=False)
    macs = artifact.manifest.macs
    return {
        "method": method,
        "restored_taps": artifact.manifest.export.get("restore_grid", []),
        "correlation": report.agreement,
        "top10_iou": report.metrics["top10_iou"],
        "mac_ratio": macs["limit_speedup"],
        "macs": macs["model"],
        "lint_ok": artifact.lint("trt10.3").ok,
    }


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for family, marker in (("topk", "o"), ("tome", "s")):
        mine = sorted((r for r in rows if r["method"].startswith(family)), key=lambda r: r["mac_ratio"])
        x = [r["mac_ratio"] for r in mine]
        ax.plot(x, [r["correlation"] for r in mine], marker=marker, label=f"{family}: map correlation")
        ax.plot(x, [r["top10_iou"] for r in mine], marker=marker, linestyle="--", label=f"{family}: top-10 % IoU")
    ax.axhline(0.97, color="grey", linewidth=0.8)
    ax.axvline(1.25, color="grey", linewidth=0.8)
    ax.set_xlabel("MAC-limit ratio (unreduced / reduced)")
    ax.set_ylabel("vs the unreduced depth map")
    ax.set_title("DPT (DINOv2-S/14 backbone, random weights), grid restored at 4 taps")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="a DPT source (hf:DIR); default: DINOv2-S/14 geometry, random weights")
    parser.add_argument("--images", type=int, default=len(PHOTOS))
    parser.add_argument("--out", default="dense")
    parser.add_argument("--methods", nargs="+", help="method strings (default: the top-k and ToMe strengths)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = args.source
        if source is None:
            (work / "dpt").mkdir()
            (work / "dpt" / "config.json").write_text(json.dumps(DPT_DINOV2_SMALL))
            source = f"hf:{work / 'dpt'}"
        baseline = tokensieve.export(source, None, work / "baseline")
        images = photos(work / "photos", args.images)
        rows = []
        for method in args.methods or [m for family in STRENGTHS.values() for m in family]:
            rows.append(measure(baseline.graph_path("model"), method, images, work))
            print(json.dumps(rows[-1]))
    RESULTS.mkdir(exist_ok=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, ONNX Runtime CPU",
        "model": args.source or "DPT, DINOv2-S/14 backbone (random weights), 224 px",
        "images": [f"skimage.data.{name}" for name in PHOTOS[: args.images]],
        "rows": rows,
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, RESULTS / f"{args.out}.png")


if __name__ == "__main__":
    main()
