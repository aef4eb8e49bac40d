"""Token reduction for models whose output is a map: the source map and the dropped rows threaded through the sites,
the full token grid restored before every reader of a block output (graph: ``--restore-grid``; eager: the same
restoration in torch), parity on values and on the source map after every site.

Hugging Face DPT (depth) on a DINOv2 backbone reads four intermediate taps: ``auto`` restores them all. A DINOv2
tower exported by another exporter with symbolic batch, height and width gives its patch tokens back on the full
grid with ``--restore-grid on`` and stays shortened with ``auto`` (its outputs are token sequences, not maps). timm's
``forward_intermediates`` (``features_only``) gives NCHW maps of two blocks."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
import transformers
from helpers import assert_parity

import tokensieve
from tokensieve.calibration.data import sample_images
from tokensieve.errors import GraphRewriteError, MethodSpecError
from tokensieve.evaluate.image import dense_metrics
from tokensieve.graph_passes.restore import RESTORE_KEY

DPT_TAPS = [1, 2, 3]  # blocks 1..3 read by the neck after a site at block 1 (block 0 precedes every site)


@pytest.fixture(scope="module")
def dpt(zoo, hf_config_dir):
    return zoo(f"hf:{hf_config_dir('dpt')}", batch=2, exporter="legacy", opset=17)


@pytest.mark.parametrize(
    ("method", "taps"), [("topk(keep=0.5, layers=[1, 2])", DPT_TAPS), ("tome(r=2, layers=[0, 2])", [0, 1, 2, 3])]
)
def test_dpt_taps_restored(dpt, tmp_path, method, taps):
    """Every tap after the first site is restored (the neck folds the tokens into 4 x 4 grids, so ``auto`` turns it
    on); the depth map has the unreduced shape and matches the eager reference, and so do the source maps."""
    path, built = dpt
    artifact = tokensieve.export(str(path), method, tmp_path / "a")
    assert artifact.manifest.export["restore_grid"] == taps
    assert artifact.manifest.outputs[0]["shape"] == [2, 64, 64]
    report = assert_parity(artifact, built)
    assert all(s.same_source == 2 for s in report.sites), report.text()
    graph = ir.load(artifact.graph_path())
    assert json.loads(graph.metadata_props[RESTORE_KEY]) == taps
    assert {n.op_type for n in graph.graph} & {"ScatterND", "ScatterElements", "NonZero"} == set()
    if method.startswith("topk"):  # the depth maps against the unreduced model's: a dense evaluation by default
        images = tmp_path / "images"
        images.mkdir()
        for i, image in enumerate(sample_images(2, seed=3, size=56)):
            image.save(images / f"{i}.png")
        quality = artifact.eval(images, save=False)
        assert quality.task == "dense" and 0.5 < quality.agreement < 1 and 0 < quality.metrics["top10_iou"] <= 1


def test_methods_without_a_source_map_are_refused(dpt, tmp_path):
    out = tmp_path / "a"
    with pytest.raises(GraphRewriteError, match=r"diffrate at block 1 says nothing about where its input tokens go"):
        tokensieve.export(str(dpt[0]), "diffrate(prune=[17, 15, 13, 13], merge=[17, 14, 13, 13])", out)
    with pytest.raises(MethodSpecError, match=r"--restore-grid is not supported with an adaptive method"):
        tokensieve.export(str(dpt[0]), "atp(threshold=0.5, layers=[1])", out, restore_grid=True, buckets=[4, 8])
    assert not out.exists()


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    """A DINOv2 tower as another exporter writes it: symbolic batch, height and width, the checkpoint beside it."""
    folder = tmp_path_factory.mktemp("dinov2_onnx")
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=56, patch_size=14
    )
    torch.manual_seed(0)
    model = transformers.Dinov2Model(config).eval()
    model.save_pretrained(folder)
    processor = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "crop_size": {"height": 56, "width": 56}}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    axes = {"pixel_values": {0: "batch", 2: "height", 3: "width"}, "last_hidden_state": {0: "batch", 1: "tokens"}}
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 56, 56),),
        folder / "model.onnx",
        input_names=["pixel_values"],
        output_names=["last_hidden_state", "pooler_output"],
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    return folder / "model.onnx"


def test_patch_outputs_on_the_full_grid(dinov2_file, tmp_path):
    """``on``: ``last_hidden_state`` keeps all 17 tokens; each position is its holder's row (or, pruned, its own row
    from the site), so positions merged into one token are equal; parity on values and source maps; the dense
    evaluation compares maps of the baseline's size. ``auto``: token sequences stay shortened."""
    artifact = tokensieve.export(dinov2_file, "topk(keep=0.5, layers=[1])", tmp_path / "on", restore_grid=True)
    assert artifact.manifest.outputs[0]["shape"][1:] == [17, 32]
    report = artifact.parity()
    assert report.ok and report.sites[0].same_source == 2, report.text()
    replayed = artifact.replay()  # the recorded eager source maps, torch-free
    assert replayed.ok and replayed.sites[0].same_source == 2, replayed.text()
    assert artifact.lint("trt10.3").ok
    pixels = np.random.default_rng(1).standard_normal((1, 3, 56, 56)).astype(np.float32)
    model, base = (artifact.runner(g, spin=False) for g in ("model", "baseline"))
    ours, theirs = (r.run({"pixel_values": pixels})["last_hidden_state"] for r in (model, base))
    assert ours.shape == theirs.shape and 0.5 < dense_metrics(ours, theirs)["agreement"] < 1
    shortened = tokensieve.export(dinov2_file, "topk(keep=0.5, layers=[1])", tmp_path / "auto")
    assert "restore_grid" not in shortened.manifest.export and shortened.manifest.outputs[0]["shape"][1:] == [9, 32]


def test_timm_forward_intermediates(zoo, tmp_path):
    """timm's ``forward_intermediates`` (``features_only``): NCHW maps of blocks 1 and 2, top-k then ToMe."""
    entry = zoo(
        "timm:vit_tiny_patch16_224?features_only=true&out_indices=(1,2)&depth=3&img_size=32",
        exporter="legacy",
        opset=17,
    )
    artifact = tokensieve.export(str(entry[0]), "topk(keep=0.5, layers=[0]) + tome(r=1, layers=[1])", tmp_path / "a")
    assert artifact.manifest.export["restore_grid"] == [1, 2]
    assert [o["shape"] for o in artifact.manifest.outputs] == [[1, 192, 2, 2], [1, 192, 2, 2]]
    assert all(s.same_source == 1 for s in assert_parity(artifact, entry[1]).sites)
