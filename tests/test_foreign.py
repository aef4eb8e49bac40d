"""ONNX files as other exporters write them (optimum-style: symbolic batch, height and width; the checkpoint and
preprocessor_config.json beside the file), made here with the legacy exporter's ``dynamic_axes``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import tokensieve
from tokensieve.errors import ParityError, SourceError

AXES = {
    "pixel_values": {0: "batch_size", 2: "height", 3: "width"},
    "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
    "pooler_output": {0: "batch_size"},
}


@pytest.fixture(scope="module")
def optimum_style(tmp_path_factory) -> Path:
    """``model.onnx`` + ``config.json`` + weights + ``preprocessor_config.json``, like ``optimum-cli export onnx``."""
    folder = tmp_path_factory.mktemp("vit_onnx")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=16
    )
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    model.save_pretrained(folder)
    processor = {"image_processor_type": "ViTImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "size": {"height": 64, "width": 64}}))
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 64, 64),),
        folder / "model.onnx",
        input_names=["pixel_values"],
        output_names=["last_hidden_state", "pooler_output"],
        dynamic_axes=AXES,
        opset_version=14,
        dynamo=False,
    )
    return folder


@pytest.mark.parametrize("method", ["topk(keep=0.5, layers=[1])", "tome(r=3)"])
def test_symbolic_image_axes_are_pinned_and_the_checkpoint_beside_is_the_reference(optimum_style, tmp_path, method):
    artifact = tokensieve.export(optimum_style / "model.onnx", method, tmp_path / "art")
    assert artifact.manifest.inputs[0]["shape"][1:] == [3, 64, 64]
    assert artifact.manifest.export["reference"] == f"hf:{optimum_style}"
    report = artifact.parity()
    assert report.ok and report.sites, report.text()


def test_without_a_size_the_error_names_the_fix_and_nothing_is_written(optimum_style, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(optimum_style / "model.onnx", lone / "model.onnx")
    with pytest.raises(SourceError, match=r"height and width are symbolic.*pass --img-size N"):
        tokensieve.export(lone / "model.onnx", "tome(r=3)", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    artifact = tokensieve.export(lone / "model.onnx", "tome(r=3)", tmp_path / "out", img_size=64)
    assert artifact.manifest.inputs[0]["shape"][1:] == [3, 64, 64] and "reference" not in artifact.manifest.export
    with pytest.raises(ParityError, match="--reference"):
        artifact.parity()
    assert artifact.parity(reference=f"hf:{optimum_style}").ok
