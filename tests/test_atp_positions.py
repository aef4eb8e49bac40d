"""ATP's bucketed stage graphs on rotary and relative-position ViTs: every stage gathers the rotary tables' rows, or
the relative position bias's rows and columns, at the original positions of the tokens in its bucket slots (padding
slots masked as before); a stage after a second site takes the positions the previous stage kept. Parity on values
and kept tokens in every routing mode and at every bucket edge, lint-clean for TensorRT 10.3."""

import onnx_ir as ir
from helpers import check_staged

import tokensieve

EVA02 = "timm:eva02_tiny_patch14_224?depth=3"  # absolute position embedding + 2-D rope, 4x4 patches at 56 px
BEIT = "timm:beit_base_patch16_224?depth=3&embed_dim=64&num_heads=2"  # a relative position bias per block


def _rewired(artifact, graph: str, key: str) -> set[str]:
    """The blocks of one stage graph whose position tables (``key`` tokensieve.rope) or biases (tokensieve.relpos)
    are gathered at the tokens' positions."""
    model = ir.load(artifact.path / graph)
    return {n.metadata_props[key] for n in model.graph if key in n.metadata_props}


def test_rotary_two_sites(zoo, tmp_path):
    """Sites at blocks 0 and 1: stage 2 starts from the identity, stage 3 takes stage 2's kept positions."""
    path, built = zoo(EVA02, img_size=56, dynamic_batch=True)
    artifact = tokensieve.export(str(path), "atp(threshold=0.5, layers=[0, 1])", tmp_path / "a", buckets=[8, 16])
    report = check_staged(artifact, built, batch=2)
    assert report.checks[0].same_kept == 2  # both images keep the eager tokens at both sites
    info = artifact.manifest.stages["graph_info"]
    assert "positions" not in info["stage2_b8.onnx"]["inputs"]
    assert info["stage3_b16_8.onnx"]["inputs"]["positions"] == ["batch", 16]  # padded like the tokens
    assert _rewired(artifact, "stage2_b16.onnx", "tokensieve.rope") == {"1"}
    assert _rewired(artifact, "stage3_b16_8.onnx", "tokensieve.rope") == {"2"}
    assert _rewired(artifact, "padmax.onnx", "tokensieve.rope") == {"1", "2"}


def test_relative_position_bias(zoo, tmp_path):
    """BEiT: the bias of every block after the site is gathered on both token axes in each bucket graph."""
    path, built = zoo(BEIT, img_size=64, dynamic_batch=True)
    artifact = tokensieve.export(str(path), "atp(threshold=0.5, layers=[1])", tmp_path / "a", buckets=[8, 16])
    check_staged(artifact, built, batch=2)
    for graph in ("stage2_b8.onnx", "stage2_b16.onnx", "padmax.onnx"):
        assert _rewired(artifact, graph, "tokensieve.relpos") == {"2"}
