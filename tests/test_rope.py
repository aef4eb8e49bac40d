"""Rotary position embeddings follow the tokens: the per-token sin/cos tables that rotate later blocks' queries and
keys are gathered at the kept tokens (pruning) or taken from each merged group's destination token (merging), in
the graph and in the eager reference; parity on values and kept tokens, lint-clean for TensorRT 10.3."""

import pytest
from helpers import export_and_check

import tokensieve
from tokensieve.errors import GraphRewriteError

VIT_ROPE = "timm:vit_small_patch16_rope_224?depth=3"
EVA02 = "timm:eva02_tiny_patch14_224?depth=3"


@pytest.mark.parametrize(
    ("source", "img_size", "method"),
    [
        (VIT_ROPE, 96, "topk(keep=0.7, layers=[1])"),  # axial 2-D rope, interleaved, CLS unrotated
        (VIT_ROPE, 96, "tome(r=8)"),
        (EVA02, 84, "topk(keep=0.6, layers=[0, 1])"),  # abs pos embed + rope, SwiGLU, two sites composed
        (EVA02, 84, "tome(r=6)"),  # average pooling: size-weighted
    ],
)
def test_rope_parity(zoo, tmp_path, source, img_size, method):
    artifact = export_and_check(zoo(source, img_size=img_size, batch=2), method, tmp_path / "a")
    assert artifact.manifest.layout["specials"] == 1
