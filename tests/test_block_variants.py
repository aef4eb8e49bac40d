"""Block classes beyond the plain ViT block, in the eager reference and the locator: the DeepSeek encoder's block
(Eva's rotary attention without LayerScale; the encoder folds the tokens into a grid after its blocks, restored in
the graph) and differential attention (two softmax maps per block combined into one). Parity on values and kept
tokens, lint-clean for TensorRT 10.3."""

import onnx_ir as ir
import pytest
from helpers import export_and_check

DEEPSEEK = "timm:deepseek_vit_412m_enc?depth=2&embed_dim=64&num_heads=2"
DIFF = "timm:vit_dlittle_patch16_reg1_gap_256?depth=2&embed_dim=64&num_heads=2"  # differential attention


def test_deepseek_encoder(zoo, tmp_path):
    artifact = export_and_check(zoo(DEEPSEEK, img_size=42, batch=2), "topk(keep=0.7, layers=[1])", tmp_path / "a")
    assert artifact.manifest.export["restore_grid"]  # the grid the encoder folds after its blocks is rebuilt


@pytest.mark.parametrize("method", ["topk(keep=0.7, layers=[1])", "tome(r=4)"])
def test_differential_attention(zoo, tmp_path, method):
    """Two softmax maps per block (``A1 - lambda * A2``): top-k scores by the first map; ToMe's proportional
    attention reaches both maps' logits (block 1, after block 0's merge)."""
    artifact = export_and_check(zoo(DIFF, img_size=64, batch=2), method, tmp_path / "a")
    model = ir.load(artifact.path / "model.onnx")
    added = {n.name.split("/")[1] for n in model.graph if n.metadata_props.get("tokensieve.method") == "prop_attn"}
    assert added == ({"prop_attn1", "prop_attn1_map1"} if method.startswith("tome") else set())
