"""Graphs from the legacy TorchScript exporter at opset 14: no metadata, decomposed LayerNorm, shapes computed
with Shape/Gather/Concat. The locator and the pruning pass must work structurally."""

import pytest
from helpers import export_and_check

import tokensieve
from tokensieve.errors import ExportError
from tokensieve.graph_passes.locate import locate_vit
from tokensieve.graph_passes.propagate import propagate_shapes


@pytest.mark.parametrize(
    ("source", "img_size", "method", "specials"),
    [
        ("timm:vit_small_patch16_224", None, "topk(keep=0.7, layers=[3,6,9])", 1),
        ("timm:vit_small_patch16_224", None, "topk(keep=0.5, layers=[0,11], fuse=true)", 1),
        ("timm:deit3_small_patch16_224", None, "topk(keep=0.7, layers=[3,6,9])", 1),
        ("timm:vit_small_patch14_reg4_dinov2", 224, "topk(keep=0.6, layers=[2,7])", 5),
    ],
)
def test_legacy_opset14_parity(zoo, tmp_path, source, img_size, method, specials):
    entry = zoo(source, exporter="legacy", opset=14, img_size=img_size)
    artifact = export_and_check(entry, method, tmp_path / "a")
    layout = artifact.manifest.layout
    assert layout["located_with"] == "structure"
    assert layout["specials"] == specials
    assert artifact.manifest.export["opset"] == 14


@pytest.mark.parametrize(
    ("tower", "method"),
    [
        ("vit", "topk(keep=0.6, layers=[1,4])"),
        ("clip", "topk(keep=0.5, layers=[2])"),
        # SigLIP's attention-pool head is an nn.MultiheadAttention: the legacy exporter computes its head split with
        # Mod/Slice shape arithmetic, which the propagation must evaluate after the token count changes.
        ("siglip", "topk(keep=0.6, layers=[1,4])"),
        ("siglip", "tome(r=8)"),
        # Dinov2 interpolates its position embeddings while tracing: sqrt(num_positions) is float shape arithmetic.
        ("dinov2", "topk(keep=0.7, layers=[0,3])"),
    ],
)
def test_legacy_hf_tower(zoo, hf_config_dir, tmp_path, tower, method):
    entry = zoo(f"hf:{hf_config_dir(tower)}", exporter="legacy", opset=14)
    artifact = export_and_check(entry, method, tmp_path / "a")
    assert artifact.manifest.layout["located_with"] == "structure"


def test_legacy_exporter_failure_is_a_typed_error(hf_config_dir, tmp_path):
    """Dinov2 with registers interpolates with antialiased bicubic, which the legacy exporter cannot write."""
    with pytest.raises(ExportError, match=r"legacy, opset 14.*dynamo exporter may support it"):
        tokensieve.export(
            f"hf:{hf_config_dir('dinov2_reg')}", "topk(keep=0.7)", tmp_path / "a", exporter="legacy", opset=14
        )
    assert not (tmp_path / "a").exists()


def test_legacy_dynamic_batch(zoo, tmp_path):
    entry = zoo("timm:vit_small_patch16_224", exporter="legacy", opset=14, dynamic_batch=True)
    export_and_check(entry, "topk(keep=0.7, layers=[3,6,9])", tmp_path / "a", batch=2)


def test_locator_agrees_across_exporters(zoo):
    import onnx_ir as ir

    dynamo = ir.load(zoo("timm:deit3_small_patch16_224")[0])
    legacy = ir.load(zoo("timm:deit3_small_patch16_224", exporter="legacy", opset=14)[0])
    propagate_shapes(legacy)
    a, b = locate_vit(dynamo), locate_vit(legacy)
    assert (
        (a.depth, a.tokens, a.channels, a.specials) == (b.depth, b.tokens, b.channels, b.specials) == (12, 197, 384, 1)
    )
    assert [blk.name for blk in a.blocks] == [f"blocks.{i}" for i in range(12)]
    assert [blk.name for blk in b.blocks] == [f"block{i}" for i in range(12)]


def test_export_cli_path_with_legacy_exporter(tmp_path):
    art = tokensieve.export(
        "timm:vit_small_patch16_224",
        "topk(keep=0.7, layers=[3])",
        tmp_path / "a",
        exporter="legacy",
        opset=14,
    )
    assert art.manifest.export["exporter"] == "legacy"
    assert art.parity(golden=False).ok
