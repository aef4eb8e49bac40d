"""Rotary position embeddings follow the tokens: the per-token sin/cos tables that rotate later blocks' queries and
keys are gathered at the kept tokens (pruning) or taken from each merged group's destination token (merging), in
the graph and in the eager reference; parity on values and kept tokens, lint-clean for TensorRT 10.3."""

import onnx_ir as ir
import pytest
from helpers import export_and_check

import tokensieve
from tokensieve.errors import GraphRewriteError

VIT_ROPE = "timm:vit_small_patch16_rope_224?depth=3"
EVA02 = "timm:eva02_tiny_patch14_224?depth=3"
MIXED = "timm:vit_small_patch16_rope_mixed_224?depth=3"
DINOV3 = "timm:vit_small_patch16_dinov3?depth=3"


@pytest.mark.parametrize(
    ("source", "img_size", "method"),
    [
        (VIT_ROPE, 96, "topk(keep=0.7, layers=[1])"),  # axial 2-D rope, interleaved, CLS unrotated
        (VIT_ROPE, 96, "tome(r=8)"),
        (EVA02, 84, "topk(keep=0.6, layers=[0, 1])"),  # abs pos embed + rope, SwiGLU, two sites composed
        (EVA02, 84, "tome(r=6)"),  # average pooling: size-weighted
        (MIXED, 96, "topk(keep=0.7, layers=[1])"),  # per-head learned frequencies: tables computed from weights
        (DINOV3, 96, "tome(r=8)"),  # rotate-half (split) layout, CLS + 4 registers unrotated
    ],
)
def test_rope_parity(zoo, tmp_path, source, img_size, method):
    artifact = export_and_check(zoo(source, img_size=img_size, batch=2), method, tmp_path / "a")
    assert artifact.manifest.layout["specials"] == (5 if source == DINOV3 else 1)
    graph = ir.load(artifact.graph_path())
    rope_blocks = {n.metadata_props["tokensieve.rope"] for n in graph.graph if "tokensieve.rope" in n.metadata_props}
    sites = [s["layer"] for s in artifact.manifest.sites]
    assert rope_blocks == {str(i) for i in range(sites[0] + 1, 3)}  # every block after the first site


def test_fused_token_has_no_position(zoo, tmp_path):
    """A fused token stands for many pruned positions: with rotary tables downstream, export stops with a typed
    error naming the table's node, and writes nothing."""
    path, _ = zoo(VIT_ROPE, img_size=96, batch=2)
    out = tmp_path / "a"
    with pytest.raises(GraphRewriteError, match=r"node '.+' \(Mul\) reads the position table .*fused token"):
        tokensieve.export(str(path), "topk(keep=0.7, layers=[1], fuse=true)", out)
    assert not out.exists()
