"""Adaptive (ATP-style) pruning served with static-shape buckets: staged artifacts, the dispatcher, calibration."""

import itertools
import json
import os
import re
import shutil

import numpy as np
import pytest
from helpers import check_staged
from PIL import Image

import tokensieve
from tokensieve.calibration.buckets import choose_buckets, quadratic_cost
from tokensieve.calibration.data import load_calibration, sample_images
from tokensieve.calibration.threshold import calibrate_threshold, keep_fraction
from tokensieve.cli import main
from tokensieve.errors import InputError, MethodSpecError, SourceError
from tokensieve.gate import gate
from tokensieve.runtimes.buckets import BucketOverflowError, Route, StagedRunner, pick_bucket


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    for i, image in enumerate(sample_images(24, seed=11)):
        image.save(folder / f"image{i:02d}.jpg")
    return folder


def test_vit_small_auto_buckets_with_calibrated_threshold(zoo, calibration_folder, tmp_path):
    path, built = zoo("timm:vit_small_patch16_224", dynamic_batch=True)
    artifact = tokensieve.export(
        str(path), "atp()", tmp_path / "a", buckets="auto", max_buckets=4, calibrate=calibration_folder, target_keep=0.5
    )
    stages = artifact.manifest.stages
    calibration = stages["calibration"]
    assert abs(calibration["achieved_keep"] - 0.5) < 0.02 and calibration["samples"] == 24
    assert len(stages["buckets"][""]) <= 4 and stages["buckets"][""][-1] == calibration["counts"]["max"][0]
    assert artifact.methods[0].threshold == pytest.approx(calibration["threshold"])
    commands = [
        line
        for line in (tmp_path / "a" / "trt" / "build_trt10.sh").read_text().splitlines()
        if line.startswith("trtexec")
    ]
    assert len(commands) == len(stages["graphs"]) + 1 and "--profile=3" in commands[-1]
    trt11 = (tmp_path / "a" / "trt" / "build_trt11.sh").read_text().splitlines()
    assert not [line for line in trt11 if line.startswith("trtexec") and "--fp16" in line]
    assert any(line.startswith("python -m modelopt.onnx.autocast") for line in trt11)
    report = check_staged(artifact, built, golden=True)
    # the recorded eager side replays without torch (every check again); a recorded kept set that differs is caught
    checks = next(c for c in gate([artifact.path]).artifacts[0].checks if c.name == "parity")
    assert checks.status == "pass" and checks.detail.startswith(f"{len(report.checks)}/{len(report.checks)} recorded")
    staged = tmp_path / "a" / "golden" / "staged.npz"
    with np.load(staged) as npz:
        recorded = dict(npz)
    key = next(k for k in recorded if k.startswith("0/kept/1/"))
    recorded[key][0] = next(i for i in range(1, 197) if i not in recorded[key])
    np.savez(staged, **recorded)
    replay = artifact.replay()
    assert not replay.ok and replay.checks[0].same_kept == 2 and replay.checks[1].passed


@pytest.mark.parametrize("method", ["atp(mass=0.8)", "atp(threshold=1.2, grid=0)", "atp(layers=[2, 6], threshold=1.0)"])
def test_vit_small_explicit_buckets(zoo, tmp_path, method):
    """ViT-S/16 widths on a 7x7 patch grid (the bucket machinery does not depend on the grid's size)."""
    path, built = zoo("timm:vit_small_patch16_224?img_size=112", dynamic_batch=True)
    artifact = tokensieve.export(str(path), method, tmp_path / "a", buckets=[16, 32, 49])
    report = check_staged(artifact, built, batch=4)
    assert artifact.manifest.stages["token_outputs"] == []  # logits are per image
    if "layers=[2, 6]" in method:
        routes = artifact.manifest.stages["buckets"]
        assert routes["16"] == [16] and routes["49"] == [16, 32, 49]  # never more slots than before
        assert report.checks[0].same_kept == 4


@pytest.mark.parametrize("family", ["vit", "dinov2_reg"])
def test_hf_tower_buckets(zoo, hf_config_dir, tmp_path, family):
    path, built = zoo(f"hf:{hf_config_dir(family)}", dynamic_batch=True)
    grid, largest = ("0.25", 196) if family == "vit" else ("0", 256)  # 14x14 and 16x16 patch grids
    artifact = tokensieve.export(
        str(path), f"atp(threshold=1.0, grid={grid})", tmp_path / "a", buckets=[64, 128, largest]
    )
    report = check_staged(artifact, built)
    assert report.outputs[0].name == "last_hidden_state"  # token-level output compared on valid tokens
    assert artifact.manifest.stages["token_outputs"] == ["last_hidden_state"]  # not pooler_output


def test_timm_map_head_buckets(zoo, tmp_path):
    """The padding bias reaches timm's MAP head (over the patches after CLS); its latent query takes the batch size
    from the cut-in stream, so stages after the cut need no image."""
    path, built = zoo("timm:vit_small_patch16_224?depth=3&img_size=64&global_pool=map", dynamic_batch=True)
    artifact = tokensieve.export(
        str(path), "atp(threshold=0.5, grid=0, layers=[1])", tmp_path / "a", buckets=[4, 8, 16]
    )
    check_staged(artifact, built, batch=2)


def test_no_cls_scores_by_received_attention(zoo, tmp_path):
    """Without a CLS token ATP ranks by the attention each token receives (mean over query rows and heads), chosen
    from the located layout and recorded; at the second site the mean runs over the previous bucket's valid rows
    only, so every bucket edge matches exact dropping. The model's output is the average pool itself: reweighted by
    validity, it keeps its name in every stage graph. ``score='cls'`` there is a typed error."""
    path, built = zoo(
        "timm:vit_tiny_patch16_224?depth=3&img_size=64&global_pool=avg&class_token=False&num_classes=0&fc_norm=False",
        dynamic_batch=True,
    )
    artifact = tokensieve.export(str(path), "atp(threshold=1.0, layers=[0, 1])", tmp_path / "a", buckets=[8, 16])
    assert (
        artifact.manifest.methods[0]["score"] == "mean_received"
        and "score='mean_received'" in artifact.manifest.method_text
    )
    check_staged(artifact, built)
    with pytest.raises(MethodSpecError, match="score='cls' needs a CLS token"):
        tokensieve.export(str(path), "atp(score='cls', layers=[0])", tmp_path / "b", buckets=[8])
    assert not (tmp_path / "b").exists()


def test_per_image_outputs_are_never_cut_as_tokens():
    """197 classes = CLS + 196 slots: the dispatcher cuts only the outputs the export recorded as token-level."""
    runner = StagedRunner(".", {"sites": [3], "specials": 1, "token_outputs": ["tokens"]})
    routes = [Route(counts=[150], buckets=[196]), Route(counts=[180], buckets=[196])]
    collected = {i: {"logits": np.zeros(197), "tokens": np.zeros((197, 8))} for i in range(2)}
    outputs = runner._assemble(collected, routes).outputs
    assert outputs["logits"].shape == (2, 197)
    assert [t.shape for t in outputs["tokens"]] == [(151, 8), (181, 8)]
    with pytest.raises(InputError, match="holds no image"):
        runner.run(np.zeros((0, 3, 224, 224), np.float32))


def test_dispatcher_overflow_and_truncation(zoo, tmp_path):
    path, built = zoo("timm:vit_small_patch16_224", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "atp(threshold=0.5, grid=0)", tmp_path / "a", buckets=[16, 32])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    with pytest.raises(BucketOverflowError, match="largest bucket holds 32"):
        StagedRunner(artifact.path, artifact.manifest.stages).run(pixels)
    result = StagedRunner(artifact.path, artifact.manifest.stages, allow_truncation=True).run(pixels)
    assert all(r.truncated and r.buckets == [32] and r.counts[0] > 32 for r in result.routes)
    assert result.outputs["logits"].shape == (2, 1000)
    report = artifact.parity(reference=built, batch=2, golden=False)  # truncation keeps the top-priority tokens
    assert report.ok, report.text()


def test_adaptive_export_errors(zoo, tmp_path):
    path, _ = zoo("timm:vit_small_patch16_224", dynamic_batch=True)
    with pytest.raises(MethodSpecError, match="data-dependent number of tokens"):
        tokensieve.export(str(path), "atp()", tmp_path / "a")
    with pytest.raises(MethodSpecError, match="needs calibration data"):
        tokensieve.export(str(path), "atp()", tmp_path / "a", buckets="auto")
    with pytest.raises(MethodSpecError, match="apply to adaptive methods"):
        tokensieve.export(str(path), "topk(keep=0.5)", tmp_path / "a", buckets=[64])
    with pytest.raises(MethodSpecError, match="larger than the 196 candidate tokens"):
        tokensieve.export(str(path), "atp()", tmp_path / "a", buckets=[64, 300])
    with pytest.raises(MethodSpecError, match="cannot be combined"):
        tokensieve.export(str(path), "atp() + tome(r=4, layers=[5])", tmp_path / "a", buckets=[64])
    assert not (tmp_path / "a").exists()


def test_bucket_dp_is_exact():
    rng = np.random.default_rng(3)
    counts = np.concatenate([rng.integers(40, 150, 12), rng.integers(60, 80, 300)])  # 30-40 distinct counts
    cost = quadratic_cost([(40, 40 * 7.0 + 40 * 40 * 0.05), (100, 700 + 500), (150, 1050 + 1125)])
    for buckets in (1, 2, 3, 4):
        plan = choose_buckets(counts, buckets, cost)
        values, freq = np.unique(counts, return_counts=True)
        costs = np.array([cost(v) for v in values])
        best = np.inf
        for combo in itertools.combinations(range(len(values) - 1), buckets - 1):
            edges = np.array([*combo, len(values) - 1])
            assigned = edges[np.searchsorted(edges, np.arange(len(values)))]  # smallest bucket >= each count
            best = min(best, float((costs[assigned] * freq).sum() / freq.sum()))
        assert plan.expected_cost == pytest.approx(best) and plan.sizes[-1] == values[-1]
        assert plan.expected_cost >= plan.oracle_cost and plan.expected_waste >= 0
    assert choose_buckets([5, 5, 5], 6, cost).sizes == [5]


def test_threshold_calibration_hits_the_target():
    scores = np.random.default_rng(0).dirichlet(np.ones(196), size=40)
    grid = np.zeros(196, dtype=bool)
    grid[::8] = True
    threshold = calibrate_threshold(scores, grid, 0.4)
    assert keep_fraction(scores, grid, threshold) == pytest.approx(0.4, abs=0.01)
    with pytest.raises(MethodSpecError, match="below what the spatial grid alone keeps"):
        calibrate_threshold(scores, grid, 0.05)


def test_calibration_data_loading(calibration_folder, tmp_path):
    data = load_calibration(calibration_folder, (3, 224, 224), (0.5,) * 3, (0.5,) * 3, limit=5)
    assert data.shape == (5, 3, 224, 224) and data.dtype == np.float32 and -1.01 <= data.min() < data.max() <= 1.01
    np.savez(tmp_path / "batches.npz", other=data)
    assert load_calibration(tmp_path / "batches.npz", (3, 224, 224), (0,) * 3, (1,) * 3).shape == (5, 3, 224, 224)
    np.savez(tmp_path / "bad.npz", x=data[:, :, :100])
    with pytest.raises(SourceError, match="the model takes"):
        load_calibration(tmp_path / "bad.npz", (3, 224, 224), (0,) * 3, (1,) * 3)
    with pytest.raises(SourceError, match="has no images"):
        load_calibration(tmp_path, (3, 224, 224), (0,) * 3, (1,) * 3)
    shape = (2, 3, 224, 224)
    for array, message in (
        (np.full(shape, "a"), "dtype <U1; give model-ready float32 inputs"),
        (np.empty(shape, object), "cannot be read without pickle"),
        (np.full(shape, np.nan, np.float32), "NaN or infinite"),
        (np.zeros(shape, np.uint8), "holds integers (uint8), not model-ready inputs"),
    ):
        np.savez(tmp_path / "odd.npz", x=array)
        with pytest.raises(SourceError, match=re.escape(message)):
            load_calibration(tmp_path / "odd.npz", (3, 224, 224), (0,) * 3, (1,) * 3)
    images = tmp_path / "deep"
    images.mkdir()
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(images / "sixteen_bit.png")
    with pytest.raises(InputError, match="has more than 8 bits per channel"):
        load_calibration(images, (3, 224, 224), (0,) * 3, (1,) * 3)


def test_pick_bucket():
    assert pick_bucket(64, [64, 96], False) == (64, False)
    assert pick_bucket(65, [64, 96], False) == (96, False)
    assert pick_bucket(100, [64, 96], True) == (96, True)
    with pytest.raises(BucketOverflowError):
        pick_bucket(100, [64, 96], False)


def test_cli_contract(calibration_folder, tmp_path, capsys):
    """The issue's command line, then parity, lint and bench unchanged."""
    out = tmp_path / "atp"
    code = main(
        [
            "export",
            "timm:vit_small_patch16_224?img_size=112",  # ViT-S/16 on a 7x7 grid: the contract, not the scale
            "--method",
            "atp()",
            "--buckets",
            "auto",
            "--calibrate",
            str(calibration_folder),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "decision site" in text and "buckets" in text and "lint: all clean" in text
    graphs = sorted(p for p in os.listdir(out) if p.endswith(".onnx"))
    assert "stage1.onnx" in graphs and "padmax.onnx" in graphs and "stage2_dynamic.onnx" in graphs
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(g in graphs for g in manifest["stages"]["graphs"].values())
    assert main(["parity", str(out), "--batch", "2", "--no-golden"]) == 0
    assert main(["lint", str(out)]) == 0
    few = tmp_path / "few"  # bench on a handful of the images (the benchmark script measures properly)
    few.mkdir()
    for image in sorted(calibration_folder.iterdir())[:4]:
        shutil.copy(image, few)
    assert main(["bench", str(out), "--data", str(few), "--blocks", "1"]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert set(report["mean_ms"]) == {"bucketed", "oracle", "padmax", "unreduced"}
