"""Hugging Face vision towers (ViTModel, CLIPVisionModel, SiglipVisionModel, Dinov2Model, Dinov2WithRegisters)
from local configs (``hf:PATH``): both outputs (last_hidden_state, pooler_output) and kept-token sets."""

import json

import pytest
from helpers import export_and_check

CASES = [
    ("vit", "topk(keep=0.7, layers=[1,3,5])", 1),
    ("vit", "topk(keep=0.5, layers=[0,4], fuse=true)", 1),
    ("clip", "topk(keep=0.7, layers=[1,3,5])", 1),
    ("clip", "topk(keep=0.3, layers=[2], fuse='mean')", 1),
    # SigLIP has no CLS token: score = mean attention received, all tokens are candidates
    ("siglip", "topk(keep=0.7, layers=[1,3,5])", 0),
    ("siglip", "topk(keep=0.5, layers=[0,5])", 0),
    ("dinov2", "topk(keep=0.7, layers=[1,3,5])", 1),
    ("dinov2", "topk(keep=0.6, layers=[2,4], fuse=true)", 1),
    ("dinov2_reg", "topk(keep=0.7, layers=[1,3,5])", 5),
    ("dinov2_reg", "topk(keep=0.45, layers=[0,3])", 5),
]


@pytest.mark.parametrize(("family", "method", "specials"), CASES)
def test_hf_tower_topk_parity(zoo, hf_config_dir, tmp_path, family, method, specials):
    artifact = export_and_check(zoo(f"hf:{hf_config_dir(family)}"), method, tmp_path / "a")
    assert artifact.manifest.layout["specials"] == specials
    assert [o["name"] for o in artifact.manifest.outputs] == ["last_hidden_state", "pooler_output"]
    (topk,) = artifact.methods
    assert topk.resolved_score(specials) == ("cls" if specials else "mean_received")
    assert artifact.manifest.outputs[0]["shape"][1] == artifact.manifest.sites[-1]["tokens_out"]


@pytest.mark.parametrize(
    ("family", "method", "specials", "outputs"),
    [
        ("deit", "topk(keep=0.6, layers=[0,2])", 2, ["last_hidden_state", "pooler_output"]),
        ("deit", "tome(r=6)", 2, ["last_hidden_state", "pooler_output"]),
        ("ijepa", "topk(keep=0.6, layers=[1])", 0, ["last_hidden_state"]),
    ],
)
def test_towers_with_other_special_tokens(zoo, hf_config_dir, tmp_path, family, method, specials, outputs):
    """DeiT (CLS + distillation token: both kept) and I-JEPA (no CLS token, no pooling layer: one output)."""
    artifact = export_and_check(zoo(f"hf:{hf_config_dir(family)}"), method, tmp_path / "a")
    assert artifact.manifest.layout["specials"] == specials
    assert [o["name"] for o in artifact.manifest.outputs] == outputs


def test_hidden_size_equal_to_token_count(zoo, tmp_path_factory, tmp_path):
    """SigLIP with 64 tokens and hidden size 64: retargeting must follow shapes, never match the number 64."""
    directory = tmp_path_factory.mktemp("siglip64")
    config = {
        "model_type": "siglip_vision_model",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "image_size": 64,
        "patch_size": 8,
    }
    (directory / "config.json").write_text(json.dumps(config))
    entry = zoo(f"hf:{directory}")
    artifact = export_and_check(entry, "topk(keep=0.5, layers=[0,1])", tmp_path / "a")
    assert artifact.manifest.tokens_per_block["model"] == [64, 32, 16]
    assert artifact.manifest.outputs[0]["shape"] == [1, 16, 64]


@pytest.mark.slow
def test_hf_vit_base_preset(zoo, tmp_path):
    artifact = export_and_check(zoo("hf:vit"), "topk(keep=0.7, layers=[3,6,9])", tmp_path / "a")
    assert artifact.manifest.tokens_per_block["model"][-1] == 69
