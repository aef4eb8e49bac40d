"""Relative position biases follow the tokens: BEiT's and timm VisionTransformerRelPos's ``[H, N, N]`` bias, added
to the attention logits, is gathered on both token axes at the original positions of the kept tokens (pruning) or of
each merged group's destination token (merging), in the graph and in the eager reference; parity on values and kept
tokens / merge maps, lint-clean for TensorRT 10.3."""

import onnx_ir as ir
import pytest
from helpers import export_and_check

import tokensieve
from tokensieve.errors import GraphRewriteError

BEIT = "timm:beit_base_patch16_224?depth=3&embed_dim=64&num_heads=2"
BEITV2 = "timm:beitv2_base_patch16_224?depth=3&embed_dim=64&num_heads=2"
# timm VisionTransformerRelPos (no CLS token, average pooling)
RELPOS_RPN = "timm:vit_relpos_small_patch16_rpn_224?depth=3&embed_dim=64&num_heads=2"
SRELPOS = "timm:vit_srelpos_small_patch16_224?depth=3&embed_dim=64&num_heads=2"


@pytest.mark.parametrize(
    ("source", "method"),
    [
        (BEIT, "topk(keep=0.6, layers=[0, 1])"),  # two sites composed
        (BEIT, "tome(r=6)"),  # average pooling: size-weighted
        (BEITV2, "topk(keep=0.5, layers=[1])"),
        (RELPOS_RPN, "tome(r=6)"),  # residual post-norm, an MLP bias per block, size-weighted mean head
        (SRELPOS, "topk(keep=0.6, layers=[0, 1])"),  # one bias shared by every block
    ],
)
def test_relpos_parity(zoo, tmp_path, source, method):
    artifact = export_and_check(zoo(source, img_size=64, batch=2), method, tmp_path / "a")
    graph = ir.load(artifact.graph_path())
    gathered = {n.metadata_props["tokensieve.relpos"] for n in graph.graph if "tokensieve.relpos" in n.metadata_props}
    sites = [s["layer"] for s in artifact.manifest.sites]
    assert gathered == {str(i) for i in range(sites[0] + 1, 3)}  # every block after the first site


def test_fused_token_has_no_position(zoo, tmp_path):
    """A fused token has no one position for the bias rows: a typed error naming the bias's node, nothing written."""
    path, _ = zoo(BEIT, img_size=64, batch=2)
    out = tmp_path / "a"
    with pytest.raises(GraphRewriteError, match=r"node '.+' \(Add\) adds the position bias .*fused token"):
        tokensieve.export(str(path), "topk(keep=0.6, layers=[0], fuse=true)", out)
    assert not out.exists()
