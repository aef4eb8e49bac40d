"""timm CaiT: talking-heads attention (a linear layer over the head axis before and after the ``Softmax``) located
and scored by the attention that multiplies V; its class token joins only in the class-attention blocks after the
patch blocks, which then attend over the reduced tokens (merged ones with their log-size, padding slots masked).
Parity on values and kept tokens / merge maps against the eager reference, lint-clean for TensorRT 10.3."""

import onnx_ir as ir
import pytest
import torch
from helpers import check_staged, export_and_check

import tokensieve
from tokensieve.converters.export import export_onnx
from tokensieve.converters.sources import build_module, parse_source
from tokensieve.graph_passes.locate import locate_vit

CAIT = "timm:cait_xxs24_224?depth=2&depth_token_only=1&embed_dim=64"  # 4 heads, 16 patch tokens at 64 px


@pytest.fixture(scope="module")
def cait(tmp_path_factory):
    """The tiny CaiT with non-zero head-mix and value biases (timm initialises biases to zero, under which a padding
    slot's value is zero and the post-softmax mix's bias on its key would go unseen), with a dynamic batch."""
    built = build_module(parse_source(CAIT, img_size=64))
    with torch.no_grad():
        for block in built.module.blocks:
            for linear in (block.attn.proj_l, block.attn.proj_w, block.attn.qkv):
                linear.bias.copy_(torch.linspace(-0.3, 0.4, linear.bias.numel()))
    model = export_onnx(built.module, torch.randn(2, *built.input_shape), built.output_names, dynamic_batch=True)
    path = tmp_path_factory.mktemp("cait") / "model.onnx"
    ir.save(model, path, external_data="weights.data")
    return path, built


def test_located(cait):
    """Both head mixes are block facts; the class attention is a pooling attention over [CLS, tokens]."""
    path, _ = cait
    layout = locate_vit(ir.load(path))
    assert layout.depth == 2 and layout.specials == 0 and layout.late == 1
    assert all(len(block.logit_ops) >= 4 and len(block.mix_ops) == 4 for block in layout.blocks)
    assert [b.probs.producer().op_type for b in layout.blocks] == ["Transpose", "Transpose"]
    assert len(layout.pooling_attention) == 1


def test_topk(cait, tmp_path):
    """No CLS in the patch stream: scored by the attention each token receives, after the post-softmax mix."""
    artifact = export_and_check(cait, "topk(keep=0.5, layers=[0])", tmp_path / "a")
    assert artifact.manifest.sites[0]["tokens_out"] == 8


def test_tome(cait, tmp_path):
    """Proportional attention after the pre-softmax mix of block 1 and in the class attention (0 on the CLS key)."""
    artifact = export_and_check(cait, "tome(r=4)", tmp_path / "a")
    model = ir.load(artifact.graph_path())
    added = {n.name.split("/")[1] for n in model.graph if n.metadata_props.get("tokensieve.method") == "prop_attn"}
    assert {"prop_attn1", "prop_attn_pool0"} <= added


def test_atp_buckets(cait, tmp_path):
    """Padding slots get no attention after the post-softmax mix (whose bias reaches every key) nor in the class
    attention: every bucket edge equals exact dropping."""
    path, built = cait
    artifact = tokensieve.export(str(path), "atp(threshold=0.5, layers=[0])", tmp_path / "a", buckets=[4, 8, 12, 16])
    check_staged(artifact, built, batch=2)
