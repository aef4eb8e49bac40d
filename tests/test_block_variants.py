"""Block classes beyond the plain ViT block, in the eager reference and the locator: the DeepSeek encoder's block
(Eva's rotary attention without LayerScale; the encoder folds the tokens into a grid after its blocks, restored in
the graph) and differential attention (two softmax maps per block combined into one). Parity on values and kept
tokens, lint-clean for TensorRT 10.3."""

from helpers import export_and_check

DEEPSEEK = "timm:deepseek_vit_412m_enc?depth=2&embed_dim=64&num_heads=2"


def test_deepseek_encoder(zoo, tmp_path):
    artifact = export_and_check(zoo(DEEPSEEK, img_size=42, batch=2), "topk(keep=0.7, layers=[1])", tmp_path / "a")
    assert artifact.manifest.export["restore_grid"]  # the grid the encoder folds after its blocks is rebuilt
