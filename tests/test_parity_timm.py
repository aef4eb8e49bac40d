"""Exported graph (ONNX Runtime) vs eager reference for timm ViTs: values and kept-token sets, lint-clean."""

import pytest
from helpers import export_and_check

CASES = [
    # (timm source, img_size, method)
    ("timm:vit_small_patch16_224", None, "topk(keep=0.7, layers=[3,6,9])"),
    ("timm:vit_small_patch16_224", None, "topk(keep=0.5, layers=[0,5,11], fuse=true)"),
    ("timm:vit_small_patch16_224", None, "topk(keep=0.25, layers=[2])"),
    ("timm:vit_small_patch16_224", None, "topk(keep=0.9, layers=[1,2,3,4], fuse='mean')"),
    ("timm:vit_small_patch16_224", None, "topk(keep=1.0, layers=[5])"),
    ("timm:deit_small_patch16_224", None, "topk(keep=0.7, layers=[3,6,9])"),
    ("timm:deit_small_patch16_224", None, "topk(keep=0.6, layers=[4,8], fuse=true)"),
    # LayerScale
    ("timm:deit3_small_patch16_224", None, "topk(keep=0.7, layers=[3,6,9])"),
    ("timm:deit3_small_patch16_224", None, "topk(keep=0.5, layers=[0,11], fuse=true)"),
    # DINOv2-style: LayerScale + 4 register tokens (specials = CLS + 4 registers)
    ("timm:vit_small_patch14_reg4_dinov2", 224, "topk(keep=0.7, layers=[3,6,9])"),
    ("timm:vit_small_patch14_reg4_dinov2", 224, "topk(keep=0.4, layers=[2,7], fuse=true)"),
    # CLS + distillation token
    ("timm:deit_small_distilled_patch16_224", None, "topk(keep=0.7, layers=[3,6,9])"),
]


@pytest.mark.parametrize(("source", "img_size", "method"), CASES)
def test_timm_topk_parity(zoo, tmp_path, source, img_size, method):
    artifact = export_and_check(zoo(source, img_size=img_size), method, tmp_path / "a")
    expected_specials = {"timm:vit_small_patch14_reg4_dinov2": 5, "timm:deit_small_distilled_patch16_224": 2}
    assert artifact.manifest.layout["specials"] == expected_specials.get(source, 1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["topk(keep=0.7, layers=[3,6,9])", "topk(keep=0.5, layers=[1,4], fuse='mean')"])
def test_vit_base_topk_parity(zoo, tmp_path, method):
    artifact = export_and_check(zoo("timm:vit_base_patch16_224"), method, tmp_path / "a")
    if method.startswith("topk(keep=0.7"):
        assert artifact.manifest.tokens_per_block["model"] == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2


def test_dynamic_batch_parity(zoo, tmp_path):
    artifact = export_and_check(
        zoo("timm:vit_small_patch16_224", dynamic_batch=True),
        "topk(keep=0.6, layers=[2,8])",
        tmp_path / "a",
        batch=3,
    )
    assert artifact.manifest.inputs[0]["shape"][0] == "batch"
    lint = artifact.lint("trt10.3")
    assert lint.ok and any(w.rule == "dynamic-batch" for w in lint.warnings)


def test_static_batch_four(zoo, tmp_path):
    export_and_check(zoo("timm:vit_small_patch16_224", batch=4), "topk(keep=0.7, layers=[3,6,9])", tmp_path / "a")


def test_fused_attention_op_opset23(zoo, tmp_path):
    """opset 23: the dynamo exporter emits ONNX Attention ops; the CLS row is recomputed from Q and K."""
    entry = zoo("timm:vit_small_patch16_224", opset=23)
    artifact = export_and_check(entry, "topk(keep=0.7, layers=[3,6,9])", tmp_path / "a", lint_target="trt10")
    assert {b["attention"] for b in artifact.manifest.layout["blocks"]} == {"fused Attention op"}
    jetpack6 = artifact.lint("trt10.3")
    assert {f.rule for f in jetpack6.errors} == {"opset", "unsupported-op"}
