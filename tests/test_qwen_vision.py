"""Qwen2.5-VL / Qwen2-VL vision graphs: the host's index tables equal the tower's, the bucket graphs (tables
folded in, TensorRT-lint clean) and the symbolic-patch-count graph match the eager tower on ONNX Runtime, on random
pixels and on preprocessed images, for grids whose windows divide the merged grid and grids whose do not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import vision_utils

from tokensieve.converters.qwen_vision import VisionGraph, build_qwen_vl, example_pixels
from tokensieve.errors import ArtifactError, InputError, SourceError
from tokensieve.exporter.qwen_vision import TOLERANCE, export_qwen_vision
from tokensieve.runtimes.qwen_image import preprocess
from tokensieve.runtimes.qwen_vision import DESCRIPTION, QwenVision, grid_tables

HOST = {"patch_size": 14, "merge_size": 2, "window_size": 112}  # windows of 4 x 4 merged tokens


@pytest.mark.parametrize("grid", [(16, 16), (10, 14), (2, 30), (34, 6)])
def test_tables_are_the_towers(grid):
    grid_thw = torch.tensor([[1, *grid]])
    tables = grid_tables(grid, HOST)
    assert np.array_equal(tables["positions"], vision_utils.get_vision_position_ids(grid_thw, 2).numpy())
    index, bounds = vision_utils.get_vision_window_index(grid_thw, 2, 112, 14)
    assert np.array_equal(tables["window_index"], index.numpy())
    lengths = np.diff(bounds.numpy()) // 4  # merged tokens per window
    assert np.array_equal(tables["window_ids"], np.repeat(np.arange(len(lengths)), lengths))
    assert np.array_equal(tables["window_index"][tables["reverse"]], np.arange(grid[0] * grid[1] // 4))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Qwen2.5-VL tiny (windows of 2 x 2 merged tokens): one bucket whose 5 x 7 merged grid leaves partial windows,
    and the dynamic graph."""
    out = tmp_path_factory.mktemp("qwen25") / "vision"
    export_qwen_vision("hf:qwen2.5-vl-tiny", [(10, 14)], out)
    model, _ = build_qwen_vl("qwen2.5-vl-tiny")
    return out, model.model.visual


def _eager(tower, pixels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    with torch.no_grad():
        return tower(torch.from_numpy(pixels), grid_thw=torch.tensor([[1, *grid]])).pooler_output.numpy()


def test_export_records_lint_and_parity(exported):
    out, _ = exported
    description = json.loads((out / DESCRIPTION).read_text())
    assert description["lint"] == {"vision_10x14.onnx": True, "vision_dynamic.onnx": True}
    assert description["dynamic"] == "vision_dynamic.onnx"
    checked = {(row["graph"], tuple(row["grid"])) for row in description["parity"]}
    assert checked == {("vision_10x14", (10, 14)), ("vision_dynamic", (10, 14)),
                       ("vision_dynamic", (12, 14))}  # fmt: skip
    assert all(row["max_abs_diff"] <= TOLERANCE * row["scale"] for row in description["parity"])


def test_images_through_the_bucket_and_the_dynamic_graph(exported):
    """A photo-sized image resized to the bucket runs the bucket graph; at its native grid, the dynamic one."""
    out, tower = exported
    vision = QwenVision.from_export(out, threads=1)
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (300, 170, 3), dtype=np.uint8)
    for grid in [(10, 14), None]:
        pixels, (_, rows, columns) = preprocess(image, vision.host, grid=grid)
        features = vision.features(pixels, (rows, columns))
        eager = _eager(tower, pixels, (rows, columns))
        assert features.shape == (rows * columns // 4, 48)
        assert np.abs(features - eager).max() <= TOLERANCE * np.abs(eager).max()
    assert (rows, columns) != (10, 14)  # the native grid is no bucket
    assert vision.nearest_bucket((rows, columns)) == (10, 14)


def test_windows_matter_at_this_size(exported):
    """The check can fail: the same graph with one window over the whole image (full attention everywhere) is far
    from the eager tower."""
    _, tower = exported
    grid = (10, 14)
    tables = {k: torch.from_numpy(v) for k, v in grid_tables(grid, {**HOST, "window_size": 56}).items()}
    pixels = example_pixels(grid, {"temporal_patch_size": 2, "patch_size": 14})
    eager = _eager(tower, pixels, grid)
    with torch.no_grad():
        right = VisionGraph(tower)(torch.from_numpy(pixels), **tables).numpy()
        tables["window_ids"] = torch.zeros_like(tables["window_ids"])
        wrong = VisionGraph(tower)(torch.from_numpy(pixels), **tables).numpy()
    assert np.abs(right - eager).max() <= TOLERANCE * np.abs(eager).max()
    assert np.abs(wrong - eager).max() > 100 * TOLERANCE * np.abs(eager).max()


def test_qwen2_vl_bucket(tmp_path):
    """Qwen2-VL has no windows: the graph takes no window tables."""
    description = export_qwen_vision("hf:qwen2-vl-tiny", [(8, 12)], tmp_path / "v", dynamic=False)
    assert description["lint"] == {"vision_8x12.onnx": True} and description["dynamic"] is None
    assert [row["graph"] for row in description["parity"]] == ["vision_8x12"]
    vision = QwenVision.from_export(tmp_path / "v")
    with pytest.raises(InputError, match="no bucket of 10x12 patches and no dynamic graph"):
        vision.features(np.zeros((120, 1176), np.float32), (10, 12))
    with pytest.raises(InputError, match="must be a float32 array"):
        vision.features(np.zeros((96, 1176)), (8, 12))
    with pytest.raises(InputError, match="80 patches do not fill a grid of 8x12"):
        vision.features(np.zeros((80, 1176), np.float32), (8, 12))


def test_bad_buckets_and_sources_are_refused(tmp_path):
    with pytest.raises(InputError, match="multiples of merge_size 2"):
        export_qwen_vision("hf:qwen2-vl-tiny", [(9, 12)], tmp_path / "a")
    with pytest.raises(SourceError, match="not a Qwen2-VL"):
        export_qwen_vision("hf:llava-tiny", [(8, 8)], tmp_path / "b")
    assert not list(tmp_path.iterdir())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="is not a vision export"):
        export_qwen_vision("hf:qwen2-vl-tiny", [(8, 8)], tmp_path / "c")
    assert [p.name for p in tmp_path.iterdir()] == ["c"] and (tmp_path / "c" / "notes.txt").is_file()
