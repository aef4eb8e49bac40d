"""Token merging in exported graphs (ToMe, PiToMe, DiffRate), alone and combined with top-k pruning: the graph on
ONNX Runtime against the eager reference, on values, token groupings and sizes; lint-clean for TensorRT 10.3."""

import pytest
from helpers import export_and_check

VIT_S_DIFFRATE = (
    "diffrate(prune=[197,196,190,168,150,139,129,117,99,78,58,3], merge=[197,194,176,156,141,133,121,107,88,64,56,3])"
)
REG4_DIFFRATE = (
    "diffrate(prune=[261,255,240,220,200,185,170,150,130,110,90,40], merge=[261,250,232,212,195,180,160,140,120,100,"
    "80,30])"
)

CASES = [
    ("timm:vit_small_patch16_224", None, "tome(r=4)"),
    ("timm:vit_small_patch16_224", None, "tome(r=8)"),
    ("timm:vit_small_patch16_224", None, "tome(r=16)"),
    ("timm:vit_small_patch16_224", None, "tome(r=8, inflection=-1)"),  # ToMe's decreasing schedule
    ("timm:vit_small_patch16_224", None, "tome(r=8, prop_attn=false)"),
    ("timm:vit_small_patch16_224", None, "pitome(ratio=0.9)"),
    # the official DeiT patch's schedule: the BSM variant in the first half of the blocks, the energy rule after
    ("timm:vit_small_patch16_224", None, "pitome(ratio=0.9, bsm_layers='first_half')"),
    ("timm:vit_small_patch16_224", None, VIT_S_DIFFRATE),
    ("timm:deit3_small_patch16_224", None, "tome(r=8)"),  # LayerScale (the official ToMe patch drops it)
    ("timm:deit3_small_patch16_224", None, "pitome(ratio=0.85)"),
    ("timm:deit3_small_patch16_224", None, VIT_S_DIFFRATE),
    ("timm:vit_small_patch14_reg4_dinov2", 224, "tome(r=12)"),  # registers are protected, never merged
    ("timm:vit_small_patch14_reg4_dinov2", 224, "pitome(ratio=0.9)"),
    ("timm:vit_small_patch14_reg4_dinov2", 224, "pitome(ratio=0.85, bsm_layers=[0,2,4,6])"),  # block 6: odd T=99
    ("timm:vit_small_patch14_reg4_dinov2", 224, REG4_DIFFRATE),
    ("timm:deit_small_distilled_patch16_224", None, "tome(r=8)"),  # CLS + distillation token
    # global average pooling becomes size-weighted
    ("timm:vit_small_patch16_224?global_pool=avg", None, "tome(r=8)"),  # avg pool over patches, CLS kept
    ("timm:vit_small_patch16_224?global_pool=avg&class_token=false", None, "pitome(ratio=0.9)"),  # no CLS
    # composability: pruning then merging, merging then pruning
    ("timm:vit_small_patch16_224", None, "topk(keep=0.7, layers=[3]) + tome(r=8, layers=[4,5,6,7,8,9,10,11])"),
    ("timm:vit_small_patch16_224", None, "tome(r=8, layers=[0,1,2,3,4,5]) + topk(keep=0.6, layers=[8], fuse=true)"),
    ("timm:deit3_small_patch16_224", None, "pitome(ratio=0.9, layers=[0,1,2]) + topk(keep=0.5, layers=[6])"),
]


@pytest.mark.parametrize(("source", "img_size", "method"), CASES)
def test_merging_parity(zoo, tmp_path, source, img_size, method):
    artifact = export_and_check(zoo(source, img_size=img_size), method, tmp_path / "a")
    sites = artifact.manifest.sites
    assert sites and all(s["exposed"] for s in sites)
    assert artifact.manifest.macs["limit_speedup"] > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tome(r=16)"])  # the other merging methods: at ViT-S above, same mechanism
def test_vit_base_merging_parity(zoo, tmp_path, method):
    export_and_check(zoo("timm:vit_base_patch16_224"), method, tmp_path / "a")


@pytest.mark.parametrize(
    ("family", "method"),
    [
        ("vit", "tome(r=12)"),
        ("vit", "pitome(ratio=0.8)"),
        ("vit", "diffrate(prune=[197,190,170,140,110,80], merge=[197,180,160,130,100,60])"),
        ("dinov2_reg", "tome(r=10, inflection=-1)"),
        ("clip", "tome(r=6)"),
        ("siglip", "tome(r=10)"),  # no CLS; the MAP pooling head gets the proportional-attention bias
        ("siglip", "pitome(ratio=0.9)"),
        ("clip", "pitome(ratio=0.8, bsm_layers='first_half')"),
    ],
)
def test_hf_tower_merging_parity(zoo, hf_config_dir, tmp_path, family, method):
    export_and_check(zoo(f"hf:{hf_config_dir(family)}"), method, tmp_path / "a")


# timm's latent-query attention pool (global_pool='map'): SigLIP-family ViTs (no CLS, the head pools every token)
# and a ViT with a CLS token (the head pools the patches after it, so it gets the bias of those tokens only)
TIMM_SIGLIP = "timm:vit_base_patch16_siglip_224?depth=3&img_size=64&embed_dim=192&num_heads=3"
TIMM_MAP_CLS = "timm:vit_small_patch16_224?depth=3&img_size=64&global_pool=map"
MAP_CASES = [
    (TIMM_SIGLIP, "tome(r=4)"),
    (TIMM_SIGLIP, "pitome(ratio=0.9)"),
    (TIMM_SIGLIP, "topk(keep=0.7, layers=[1])"),
    (TIMM_MAP_CLS, "tome(r=4)"),
    (TIMM_MAP_CLS, "pitome(ratio=0.9)"),
    (TIMM_MAP_CLS, "diffrate(prune=[17,16,14], merge=[17,15,12])"),
    (TIMM_MAP_CLS, "topk(keep=0.7, layers=[1])"),
    # NaFlexViT pools through its own `_pool` (which also takes patch_valid): MAP and size-weighted average
    ("timm:naflexvit_base_patch16_map?depth=2&img_size=64&embed_dim=192&num_heads=3", "tome(r=4)"),
    ("timm:naflexvit_base_patch16_gap?depth=2&img_size=64&embed_dim=192&num_heads=3", "tome(r=4)"),
]


@pytest.mark.parametrize(("source", "method"), MAP_CASES)
def test_timm_map_head_parity(zoo, tmp_path, source, method):
    import onnx_ir as ir

    artifact = export_and_check(zoo(source), method, tmp_path / "a")
    graph = ir.load(artifact.graph_path("model")).graph
    pooled = [n for n in graph if n.name.startswith("tokensieve/prop_attn_pool")]
    mapped = "map" in source or "siglip" in source  # merging: the head's Softmax gets log(size); pruning: nothing
    assert bool(pooled) == ("topk" not in method and mapped)


def test_timm_map_head_fused_attention_gets_the_size_bias(zoo, tmp_path):
    """Opset 23: the MAP head's fused ``Attention`` op gets ``log(size)`` of the patches as its mask."""
    import onnx_ir as ir

    artifact = export_and_check(zoo(TIMM_MAP_CLS, opset=23), "tome(r=4)", tmp_path / "a", lint_target="trt10")
    attention = [n for n in ir.load(artifact.graph_path("model")).graph if n.op_type == "Attention"]
    assert len(attention) == 4 and len(attention[-1].inputs) == 4 and attention[-1].inputs[3] is not None


def test_merging_with_legacy_exporter_and_dynamic_batch(zoo, tmp_path):
    export_and_check(zoo("timm:deit3_small_patch16_224", exporter="legacy", opset=14), "tome(r=8)", tmp_path / "a")
    export_and_check(zoo("timm:vit_small_patch16_224", dynamic_batch=True), "tome(r=16)", tmp_path / "b", batch=3)
    export_and_check(zoo("timm:vit_small_patch16_224", dynamic_batch=True), VIT_S_DIFFRATE, tmp_path / "c", batch=2)


def test_fused_attention_gets_the_size_bias_as_its_mask(zoo, tmp_path):
    artifact = export_and_check(
        zoo("timm:vit_small_patch16_224", opset=23), "tome(r=8)", tmp_path / "a", lint_target="trt10"
    )
    import onnx_ir as ir

    attention = [n for n in ir.load(artifact.graph_path("model")).graph if n.op_type == "Attention"]
    assert len(attention) == 12 and all(len(n.inputs) == 4 and n.inputs[3] is not None for n in attention[1:])


def test_merge_graph_has_no_scatter(zoo, tmp_path):
    import onnx_ir as ir

    import tokensieve

    artifact = tokensieve.export(str(zoo("timm:vit_small_patch16_224")[0]), "tome(r=8)", tmp_path / "a")
    ops = {n.op_type for n in ir.load(artifact.graph_path("model")).graph}
    assert not ops & {"ScatterElements", "ScatterND", "NonZero", "Loop"}
    assert {"TopK", "ArgMax", "GatherND", "MatMul"} <= ops
