"""Qwen2-VL / Qwen2.5-VL, config only: the processor's image geometry, the vision tower's MACs and ``tokensieve
plan`` on the published 3B / 7B configurations; export refuses the family with a typed error."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from tokensieve.converters.qwen_vl import QWEN_VL_PRESETS, vision_geometry
from tokensieve.errors import InputError
from tokensieve.plan.mllm import image_token_count, plan_mllm
from tokensieve.runtimes.qwen_image import patch_grid, smart_resize
from tokensieve.runtimes.qwen_vision import tower_macs

SIZES = [(1, 1), (20, 20), (28, 28), (56, 300), (300, 56), (480, 640), (1080, 1920), (4000, 3000), (9000, 60)]
HOST = {"kind": "qwen2_5_vl", "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}


@pytest.mark.parametrize("bounds", [(56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 1024 * 28 * 28), (3136, 12845056)])
def test_smart_resize_is_the_processors(bounds):
    for height, width in SIZES:
        assert smart_resize(height, width, 28, *bounds) == hf_smart_resize(height, width, 28, *bounds)


def test_grid_is_the_processors_on_images():
    processor = transformers.Qwen2VLImageProcessor(min_pixels=128 * 28 * 28, max_pixels=512 * 28 * 28)
    host = {**HOST, "min_pixels": 128 * 28 * 28, "max_pixels": 512 * 28 * 28}
    rng = np.random.default_rng(0)
    for size in [(240, 320), (333, 500), (1000, 200), (64, 64)]:
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        grid = processor(images=[image], return_tensors="np")["image_grid_thw"][0]
        assert patch_grid(size, host) == tuple(int(g) for g in grid), size
        assert image_token_count(host, size) == (int(np.prod(grid)) // 4, 1)


def test_elongated_image_is_refused_as_the_processor_does():
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(10, 2500, 28, 3136, 12845056)


@pytest.mark.parametrize(
    "family, vision",
    [
        ("Qwen2_5_VL", {"depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 40,
                        "window_size": 56, "fullatt_block_indexes": [1]}),
        ("Qwen2VL", {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "hidden_size": 40}),
    ],
)  # fmt: skip
def test_vision_macs_are_the_towers(family, vision):
    """The MAC formula (windows that do not divide the grid included) equals what torch counts in the tower."""
    text = {"hidden_size": 40, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 1}  # fmt: skip
    config = getattr(transformers, f"{family}Config")(vision_config=vision, text_config=text)
    config.vision_config._attn_implementation = "eager"  # matmuls torch's counter sees
    tower = getattr(transformers, f"{family}ForConditionalGeneration")(config).eval().model.visual
    for rows, columns in [(10, 14), (4, 18)]:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            tower(torch.randn(rows * columns, 3 * 2 * 14 * 14), grid_thw=torch.tensor([[1, rows, columns]]))
        assert counter.get_total_flops() == 2 * tower_macs(vision_geometry(config), rows, columns)


def test_plan_at_the_published_geometries(tmp_path):
    prompt, rows = plan_mllm("hf:qwen2.5-vl-7b-shapes", ["fastv(k=2, keep=0.5)", "h2o(budget=256)"])
    assert prompt.image_tokens == 576 and prompt.crops == 1  # 672 x 672 -> 48 x 48 patches, merged 2 x 2
    none, fastv, h2o = rows
    assert none.tokens_per_layer == [636] * 28 and fastv.tokens_per_layer == [636] * 2 + [348] * 26
    assert 1.7 < fastv.limit_speedup < 1.8 and h2o.slots == 257 and h2o.unbounded
    assert none.cache_mib == pytest.approx(28 * 4 * 892 * 2 * 128 * 4 / 2**20)  # GQA: 4 KV heads of 128
    # a user's config directory as published (text sizes at the top level): the processor's pixel bounds count
    preset = QWEN_VL_PRESETS["qwen2.5-vl-3b-shapes"]
    config = {"model_type": "qwen2_5_vl", **preset["text"], "vision_config": preset["vision"], "image_token_id": 151655}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 256 * 28 * 28}))
    prompt, rows = plan_mllm(f"hf:{tmp_path}", [], image_size=(1080, 1920))
    assert prompt.image_tokens == 252 and len(rows[0].tokens_per_layer) == 36  # 1080x1920 -> 336x588 px: 12x21


def test_cli_plans_and_export_refuses_the_planning_preset(tmp_path):
    """``plan`` from the config alone; ``export`` refuses the full-depth planning preset before building it."""
    cli = [sys.executable, "-m", "tokensieve"]
    out = subprocess.run([*cli, "plan", "hf:qwen2.5-vl-3b-shapes", "--method", "fastv", "--json"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert json.loads(out)["prompt"]["vision_macs"] > 0
    done = subprocess.run([*cli, "export", "hf:qwen2.5-vl-3b-shapes", "--out", str(tmp_path / "a")],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "planning preset" in done.stderr and "hf:qwen2.5-vl-3b-bench" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "a").exists()
