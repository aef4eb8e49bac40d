"""GlobalCom² on LLaVA-NeXT: both faces (host numpy selection, eager torch reference) against tensors from the
official code (tests/golden/make_globalcom2_golden.py), end-to-end parity of an exported artifact (kept vision
tokens, prompt ids, logits, greedy tokens) with the eager reference, lint, inspect, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_bench_runs
from PIL import Image

import tokensieve
from tokensieve.cli import main
from tokensieve.errors import MethodSpecError
from tokensieve.methods import parse_methods
from tokensieve.methods.globalcom2 import GlobalCom2
from tokensieve.parity.mllm import replay_llava_golden
from tokensieve.reference.globalcom2 import select_tokens
from tokensieve.runtimes.globalcom2 import bilinear, select_features

GOLDEN = np.load(Path(__file__).parent / "golden" / "official_globalcom2.npz")
CASES = range(len({k.split("/")[0] for k in GOLDEN.files}))
NEWLINE = np.full(3, -1.0, np.float32)  # the golden features are (image, row, column); the newline is -1s


def _case(i: int) -> dict:
    crop, pinpoints = int(GOLDEN[f"{i}/crop"]), GOLDEN[f"{i}/pinpoints"].tolist()
    features, scores = GOLDEN[f"{i}/features"], GOLDEN[f"{i}/scores"]
    side = int(features.shape[1] ** 0.5)
    return {
        "size": tuple(int(x) for x in GOLDEN[f"{i}/size"]),
        "host": {"image_size": crop, "patch_size": crop // side, "grid_pinpoints": pinpoints},
        "features": features,
        "scores": scores,
        "official": GOLDEN[f"{i}/packed"],
    }


def _both_faces(case: dict, method: GlobalCom2):
    host, size = case["host"], case["size"]
    packed, kept = select_features(case["features"], case["scores"], size, host, NEWLINE, method)
    tensors = (torch.from_numpy(case["features"]), torch.from_numpy(case["scores"]))
    reference = select_tokens(
        *tensors, size, host["grid_pinpoints"], host["image_size"], torch.from_numpy(NEWLINE), method
    )
    return (packed, kept), tuple(t.numpy() for t in reference)


@pytest.mark.parametrize("i", CASES)
def test_both_faces_reproduce_the_official_code(i):
    case = _case(i)
    (packed, kept), (ref_packed, ref_kept) = _both_faces(case, GlobalCom2(layout="official"))
    assert np.array_equal(packed, case["official"]) and np.array_equal(ref_packed, case["official"])
    assert np.array_equal(kept, ref_kept)
    tokens = case["features"].reshape(-1, 3)
    assert np.array_equal(packed[packed[:, 0] >= 0], tokens[kept])  # kept indexes the vision tokens, in order


@pytest.mark.parametrize("i", CASES)
def test_grid_layout_selects_the_same_tokens_at_their_own_places(i):
    case = _case(i)
    (packed, kept), (ref_packed, ref_kept) = _both_faces(case, GlobalCom2())
    assert np.array_equal(packed, ref_packed) and np.array_equal(kept, ref_kept)
    official = case["official"]
    assert sorted(map(tuple, packed[packed[:, 0] >= 0].tolist())) == sorted(
        map(tuple, official[official[:, 0] >= 0].tolist())
    )
    crops = packed[GlobalCom2().thumbnail_count(case["features"].shape[1]) :]
    rows = np.split(crops, np.flatnonzero(crops[:, 0] < 0)[:-1] + 1)
    # every emitted row holds tokens of one grid row, left to right, and ends with the newline
    for row in rows:
        assert row[-1, 0] < 0 and not (row[:-1, 0] < 0).any()
        if len(row) > 2:
            assert np.all(np.diff(row[:-1, 0] * 1000 + row[:-1, 2]) > 0)


def test_bilinear_matches_torch_interpolate():
    grid = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    for size in ((5, 8), (13, 21), (8, 3), (24, 24)):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(grid)[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(bilinear(grid, *size), expected, rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("globalcom2")
    cli = ["export", "hf:llava-next-tiny", "--method", "globalcom2()", "--no-growing-cache", "--out", str(root / "a")]
    assert main(cli) == 0
    return tokensieve.load(root / "a")


def test_parity_with_the_eager_reference_on_kept_tokens_ids_and_logits(artifact):
    report = artifact.parity(count=4, new_tokens=32, caches=("fixed",))
    assert report.ok, report.text()
    unreduced = {(112, 112): 136, (89, 201): 200, (302, 123): 244, (224, 224): 336}  # LLaVA-NeXT's own counts
    for case in report.cases:
        assert case.kept_match and case.tokens_match and case.prompt_ids_match and case.logits_error < 1e-5
        assert case.image_tokens < 0.4 * unreduced[tuple(case.image_size)]
    replay = replay_llava_golden(artifact, caches=("fixed",))
    assert replay.ok and all(c.kept_match for c in replay.cases), replay.text()


def test_official_layout_and_other_parameters_hold_parity(tmp_path):
    method = "globalcom2(retention=0.5, temperature=2, layout='official')"
    other = tokensieve.export("hf:llava-next-tiny", method, out=tmp_path / "b", growing_cache=False)
    report = other.parity(count=4, new_tokens=16, caches=("fixed",))
    assert report.ok and all(c.kept_match for c in report.cases), report.text()
    tall = next(c for c in report.cases if c.image_size == [302, 123])  # padded rows each get a newline
    assert tall.kept_tokens + 3 * 8 == tall.image_tokens


def test_lint_inspect_generate(artifact, capsys, tmp_path):
    manifest = artifact.manifest
    assert manifest.method_text == "globalcom2(retention=0.25, temperature=10)"
    assert all(entry["ok"] for entry in manifest.lint.values()), manifest.lint
    assert [v["name"] for v in manifest.io["vision"]["outputs"]] == ["image_features", "cls_scores"]
    assert main(["inspect", str(artifact.path)]) == 0
    assert "keeps 16 of 64 thumbnail tokens" in capsys.readouterr().out
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (100, 140, 3), dtype=np.uint8)).save(image)
    assert main(["generate", str(artifact.path), "--image", str(image), "--prompt", "What?", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 16 < out["kept_image_tokens"] < out["image_span"][1] - out["image_span"][0]


def test_bad_requests_are_typed_errors(tmp_path):
    with pytest.raises(MethodSpecError, match="plain LLaVA"):
        tokensieve.export("hf:llava-tiny", "globalcom2()", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for text, message in (
        ("globalcom2(retention=0)", "retention must be in"),
        ("globalcom2(temperature=0)", "temperature must be a positive number"),
        ("globalcom2(layout='rows')", "layout must be one of"),
    ):
        with pytest.raises(MethodSpecError, match=message):
            parse_methods(text)
    assert main(["export", "hf:llava-tiny", "--method", "globalcom2()", "--out", str(tmp_path / "out")]) == 2


def test_bench_drives_the_method_graphs(artifact):
    assert_bench_runs(artifact)


def test_images_too_thin_for_a_crop_row_keep_the_thumbnail_tokens(artifact):
    """Unpadding a 2x400 (or 400x2) image leaves no crop row (column): only the thumbnail's selection is kept, on
    both faces (the official code's interpolate would fail on the empty grid)."""
    rng = np.random.default_rng(0)
    cases = [
        ("Wide?", rng.integers(0, 256, (2, 400, 3), dtype=np.uint8)),
        ("Tall?", rng.integers(0, 256, (400, 2, 3), dtype=np.uint8)),
    ]
    report = artifact.parity(cases=cases, new_tokens=4, golden=False)
    assert report.ok, report.text()
