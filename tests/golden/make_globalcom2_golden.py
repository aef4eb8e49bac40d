"""Regenerate ``official_globalcom2.npz``: what the official GlobalCom² code (xuyang-liu16/GlobalCom2 @ 96b2d00,
Apache-2.0) packs for seeded synthetic scores and features on several LLaVA-NeXT geometries. Only the inputs and
the resulting tensors are committed, never the official code (docs/methods.md#licences).

    python tests/golden/make_globalcom2_golden.py --globalcom2 DIR

DIR is a checkout (or a bare mirror) of the official repository. ``llava/model/llava_arch.py`` imports the rest of
the LLaVA package, so only the functions GlobalCom² needs are taken from it (by name, with :mod:`ast`) and run in a
namespace of their own, outside this repository's package.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

PATH = "llava/model/llava_arch.py"
FUNCTIONS = {
    "generate_scale_for_crop_features",
    "extract_actual_dimensions",
    "get_original_indices",
    "get_actual_crop_dimensions",
    "interpolate_and_split_cls_attn_scores",
    "select_topk_crop_features",
    "compress_thumbnail",
    "compress_crops",
}
OUT = Path(__file__).with_name("official_globalcom2.npz")
# (crop side in pixels, patch grid side, grid pinpoints): the tiny preset's and LLaVA-NeXT-7B's
GEOMETRIES = {
    "tiny": (112, 8, [[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]]),
    "7b": (336, 24, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
}
SIZES = {"tiny": [(112, 112), (89, 201), (302, 123), (224, 224), (150, 330)], "7b": [(480, 640), (900, 300)]}


def _official(repo: str) -> types.SimpleNamespace:
    path = Path(repo) / PATH
    if path.is_file():
        text = path.read_text()
    else:  # a bare mirror
        show = ["git", f"--git-dir={repo}", "show", f"HEAD:{PATH}"]
        text = subprocess.run(show, check=True, capture_output=True, text=True).stdout
    tree = ast.parse(text)
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in FUNCTIONS]
    namespace = {"torch": torch, "F": F, "np": np, "retention_ratio": 0.25}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), PATH, "exec"), namespace)
    return types.SimpleNamespace(**{name: namespace[name] for name in FUNCTIONS})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--globalcom2", required=True)
    official = _official(parser.parse_args().globalcom2)
    generator = torch.Generator().manual_seed(20261206)
    data: dict[str, np.ndarray] = {}
    case = 0
    for geometry, (crop, side, pinpoints) in GEOMETRIES.items():
        for height, width in SIZES[geometry]:
            rows, columns = get_anyres_image_grid_shape((height, width), pinpoints, crop)
            count, tokens = 1 + rows * columns, side * side
            scores = torch.randn(count, tokens, generator=generator)
            # features that name their token exactly, also after the official fp16 cast: (image, row, column)
            patch, token = torch.meshgrid(torch.arange(count), torch.arange(tokens), indexing="ij")
            features = torch.stack([patch, token // side, token % side], -1).float()
            newline = torch.full((3,), -1.0)
            thumbnail, _ = official.compress_thumbnail(None, features[0], scores[0])
            scales = official.generate_scale_for_crop_features(scores[0], columns, rows)
            model = types.SimpleNamespace(model=types.SimpleNamespace(image_newline=newline))
            crops = official.compress_crops(
                model, features[1:], scores[1:], scores[0], columns, rows, side, side, (width, height), scales
            )
            data |= {
                f"{case}/size": np.array([height, width]),
                f"{case}/crop": np.array(crop),
                f"{case}/pinpoints": np.array(pinpoints),
                f"{case}/scores": scores.numpy(),
                f"{case}/features": features.numpy(),
                f"{case}/packed": torch.cat([thumbnail, crops.float()]).numpy(),
            }
            case += 1
    np.savez_compressed(OUT, **data)
    print(f"wrote {OUT} ({case} cases)")


if __name__ == "__main__":
    main()
