"""The block locator on exported graphs: names, sites, special tokens, errors."""

import onnx_ir as ir
import pytest

from tokensieve.errors import LocateError
from tokensieve.graph_passes.locate import locate_vit


def test_located_sites_are_complete(zoo):
    model = ir.load(zoo("timm:vit_small_patch16_224")[0])
    layout = locate_vit(model)
    assert (layout.depth, layout.tokens, layout.channels, layout.specials, layout.batch) == (
        12,
        197,
        384,
        1,
        1,
    )
    block = layout.blocks[3]
    assert block.name == "blocks.3" and block.heads == 6 and block.head_dim == 64 and not block.fused
    assert list(block.query.shape) == [1, 6, 197, 64] and list(block.key.shape) == [1, 6, 64, 197]
    assert block.residual_add.op_type == "Add" and list(block.post_attention.shape) == [1, 197, 384]
    assert layout.uses_metadata


def test_specials_override(zoo):
    model = ir.load(zoo("timm:vit_small_patch16_224")[0])
    assert locate_vit(model, specials=3).specials == 3
    with pytest.raises(LocateError, match="out of range"):
        locate_vit(model, specials=197)


def test_one_patch_image_has_its_cls_ahead(zoo):
    """An image of one patch: the token Concat joins two inputs of one token each; the last is the patch (timm's
    hybrid ViTs at a small size got this wrong as a token after the patches)."""
    layout = locate_vit(ir.load(zoo("timm:vit_tiny_patch16_224?depth=1", img_size=16)[0]))
    assert (layout.tokens, layout.specials) == (2, 1)


def test_already_reduced_graph_is_rejected(zoo, tmp_path):
    import tokensieve

    art = tokensieve.export(str(zoo("timm:vit_small_patch16_224")[0]), "topk(keep=0.5, layers=[2])", tmp_path / "a")
    with pytest.raises(LocateError, match="already token-reduced"):
        locate_vit(ir.load(art.graph_path("model")))
