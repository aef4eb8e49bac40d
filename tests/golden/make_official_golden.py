"""Regenerate ``official_merging.npz``: outputs of the official ToMe, PiToMe and DiffRate merge functions on
seeded synthetic tensors (docs/methods.md#licences: only the resulting tensors and the inputs are committed, never the
official code, which is CC-BY-NC or unlicensed).

    python tests/golden/make_official_golden.py --tome DIR --pitome DIR --diffrate DIR

Each DIR is a checkout (or a bare mirror) of facebookresearch/ToMe, hchautran/PiToMe, OpenGVLab/DiffRate. The files
needed are read into a temporary directory outside this repository and imported from there.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

FILES = {"tome": "tome/merge.py", "pitome": "algo/pitome/merge.py", "diffrate": "DiffRate/merge.py"}
OUT = Path(__file__).with_name("official_merging.npz")


def _load(repo: str, path: str, tmp: Path):
    repo_path = Path(repo)
    target = tmp / path.replace("/", "_")
    if (repo_path / path).is_file():
        target.write_text((repo_path / path).read_text())
    else:  # a bare mirror
        target.write_text(
            subprocess.run(
                ["git", f"--git-dir={repo}", "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
            ).stdout
        )
    spec = importlib.util.spec_from_file_location(target.stem, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in FILES:
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(20261128)
    B, N, d, C = 2, 37, 16, 24
    data = {
        "metric": torch.randn(B, N, d, generator=generator),
        "x": torch.randn(B, N, C, generator=generator),
        "size": 1.0 + torch.rand(B, N, generator=generator),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tome = _load(args.tome, FILES["tome"], Path(tmp))
        pitome = _load(args.pitome, FILES["pitome"], Path(tmp))
        diffrate = _load(args.diffrate, FILES["diffrate"], Path(tmp))

        merge, _ = tome.bipartite_soft_matching(data["metric"], r=7, class_token=True, distill_token=False)
        x, size = tome.merge_wavg(merge, data["x"], data["size"][..., None])
        data |= {
            "tome_r": torch.tensor(7),
            "tome_x": x,
            "tome_size": size[..., 0],
            "tome_source": tome.merge_source(merge, data["x"]),
        }

        merge = pitome.pitome_vision(data["metric"], ratio=0.8, margin=0.45, class_token=True)
        x, size = pitome.merge_wavg(merge, data["x"], data["size"][..., None])
        data |= {
            "pitome_ratio": torch.tensor(0.8),
            "pitome_margin": torch.tensor(0.45),
            "pitome_x": x,
            "pitome_size": size[..., 0],
            "pitome_source": pitome.merge_source(merge, data["x"]),
        }

        merge = pitome.pitome_vision(data["metric"], ratio=0.8, margin=0.45, class_token=True, use_bsm_pitome=True)
        x, size = pitome.merge_wavg(merge, data["x"], data["size"][..., None])
        data |= {
            "pitome_bsm_x": x,
            "pitome_bsm_size": size[..., 0],
            "pitome_bsm_source": pitome.merge_source(merge, data["x"]),
        }

        kept = 21  # DiffRate merges x[:, 21:] into x[:, :21] (already sorted by CLS attention, CLS first)
        merge, node_max = diffrate.get_merge_func(data["x"], kept_number=kept)
        size = torch.cat([data["size"][:, :kept], data["size"][:, kept:] * node_max], dim=1)[..., None]
        data |= {
            "diffrate_kept": torch.tensor(kept),
            "diffrate_x": merge(data["x"], mode="mean"),
            "diffrate_size": merge(size, mode="sum")[..., 0],
        }
    np.savez_compressed(OUT, **{k: v.numpy() for k, v in data.items()})
    print(f"wrote {OUT}: {sorted(data)}")


if __name__ == "__main__":
    main()
