"""Zero-TPrune: weighted PageRank importance + similarity pruning, static (top-k) and threshold (bucketed) forms.

Exported graphs (ONNX Runtime) against the eager reference on values and kept tokens, on a timm ViT and HF towers
(CLS, no CLS, registers); lint trt10.3; counts, typed errors, plan and bench."""

import json
from fractions import Fraction

import pytest
import torch
from helpers import assert_parity, export_and_check

import tokensieve
from tokensieve.calibration.data import sample_images
from tokensieve.errors import MethodSpecError
from tokensieve.methods import methods_from_dicts, parse_methods
from tokensieve.methods.zerotprune import ZeroTPrune
from tokensieve.plan.image import plan
from tokensieve.reference import zerotprune as reference

TIMM = "timm:vit_tiny_patch16_224?img_size=112"  # 12 blocks, 49 patches + CLS
SMALL = "timm:vit_tiny_patch16_224?depth=4&img_size=64"  # 4 blocks, 16 patches + CLS
# tiny HF towers (config only): DINOv2 with registers (CLS + 4 registers) and SigLIP (no CLS)
HF_CONFIGS = {
    "dinov2_reg": {
        "model_type": "dinov2_with_registers",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "mlp_ratio": 2,
        "image_size": 56,
        "patch_size": 14,
        "num_register_tokens": 4,
    },
    "siglip": {
        "model_type": "siglip_vision_model",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "image_size": 64,
        "patch_size": 16,
    },
}


@pytest.fixture(scope="module")
def timm_tiny(zoo):
    return zoo(TIMM)


@pytest.fixture(scope="module")
def pruned(timm_tiny, tmp_path_factory):
    path, _ = timm_tiny
    return tokensieve.export(str(path), "zerotprune(keep=0.7, layers=[3,6,9])", tmp_path_factory.mktemp("zt") / "a")


@pytest.mark.parametrize(
    "method",
    [
        "zerotprune(keep=0.7, layers=[1,5,9])",  # the paper's iteration schedule (30 / 5 / 1), EIR, head filter
        "zerotprune(keep=0.5, layers=[0,6], iterations=3, similar=1, eir=false, head_filter=[5, 10])",  # no head passes
        "zerotprune(keep=0.6, layers=[1,5], similar=0, head_filter=[0.08, 0.21])",  # a narrow range: heads left out
    ],
)
def test_timm_parity(timm_tiny, tmp_path, method):
    artifact = export_and_check(timm_tiny, method, tmp_path / "a")
    (declared,) = artifact.methods
    assert declared == parse_methods(method)[0]
    if method.startswith("zerotprune(keep=0.7"):
        assert artifact.manifest.tokens_per_block["model"] == [50] * 2 + [36] * 4 + [26] * 4 + [19] * 2


@pytest.mark.parametrize(
    ("family", "method", "specials"),
    [
        ("dinov2_reg", "zerotprune(keep=0.6, layers=[0,2], similar=0.75)", 5),  # CLS + 4 registers never pruned
        (
            "siglip",
            "zerotprune(keep=0.5, layers=[1,3], iterations=4, head_filter=none)",
            0,
        ),  # no CLS: every token a candidate
    ],
)
def test_hf_tower_parity(zoo, tmp_path_factory, tmp_path, family, method, specials):
    directory = tmp_path_factory.mktemp(family)
    (directory / "config.json").write_text(json.dumps(HF_CONFIGS[family]))
    artifact = export_and_check(zoo(f"hf:{directory}"), method, tmp_path / "a")
    assert artifact.manifest.layout["specials"] == specials
    assert [o["name"] for o in artifact.manifest.outputs] == ["last_hidden_state", "pooler_output"]
    assert artifact.manifest.outputs[0]["shape"][1] == artifact.manifest.sites[-1]["tokens_out"]


def test_relative_position_bias_parity(zoo, tmp_path):
    """BEiT's relative position bias: the attention graph includes it, and it follows the kept tokens."""
    export_and_check(
        zoo("timm:beit_base_patch16_224?depth=3&embed_dim=64&num_heads=2"),
        "zerotprune(keep=0.6, layers=[0,1])",
        tmp_path / "a",
    )


def test_a_wrong_selection_fails_parity(timm_tiny, pruned, monkeypatch):
    """The reference's S-stage with the two groups swapped: parity must see it."""
    artifact, built = pruned, timm_tiny[1]
    right = reference.similarity_pruned
    monkeypatch.setattr(reference, "similarity_pruned", lambda s, k, g, c: right(-s, k, g, c))  # groups swapped
    report = artifact.parity(reference=built, tolerance=1e-4, golden=False)
    assert not report.ok and not report.sites[0].ok


def test_threshold_form_with_buckets(zoo, tmp_path_factory, tmp_path):
    """The data-dependent form: two decision sites (the second scores the valid slots of a bucket only), the
    threshold calibrated to a target keep, bucketed stage graphs checked at every bucket edge."""
    path, built = zoo(SMALL, dynamic_batch=True)
    images = tmp_path_factory.mktemp("zerotprune_calibration")
    for i, image in enumerate(sample_images(4, seed=5)):
        image.save(images / f"image{i}.jpg")
    artifact = tokensieve.export(
        str(path),
        "zerotprune(threshold=1.0, layers=[1,2])",
        tmp_path / "a",
        buckets=[8, 16],
        calibrate=images,
        target_keep=0.6,
    )
    calibration = artifact.manifest.stages["calibration"]
    assert abs(calibration["achieved_keep"] - 0.6) < 0.1
    assert artifact.methods[0].threshold == pytest.approx(calibration["threshold"])
    report = artifact.parity(reference=built, batch=2, golden=False)
    assert report.ok, report.text()
    assert len([c for c in report.checks if "exact fit" in c.label or "largest bucket" in c.label]) == 2
    lint = artifact.lint("trt10.3")
    assert lint.ok, lint.text()


def test_counts_and_iteration_schedule():
    method = ZeroTPrune(keep=Fraction(7, 10))
    assert method.counts(196) == {"kept": 138, "similar": 29, "group": 98}  # 58 pruned: 29 by similarity
    assert ZeroTPrune(keep=Fraction(1, 10), similar=1).counts(196)["similar"] == 98  # at most the group
    assert [method.iterations_at(layer, 12) for layer in (0, 2, 3, 8, 9, 11)] == [30, 30, 5, 5, 1, 1]
    assert ZeroTPrune(keep=Fraction(1, 2), iterations=7).iterations_at(0, 12) == 7
    for text in ("zerotprune(keep=0.7, similar=0.25, head_filter=none)", "zerotprune(threshold=1.5, layers=[4])"):
        (parsed,) = parse_methods(text)
        assert methods_from_dicts([parsed.to_dict()]) == [parsed]
        assert parsed.adaptive == ("threshold" in text)


def test_head_filter_and_emphasis():
    """Heads outside the variance range are left out; the kept heads combine by root mean square (EIR)."""
    s = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2]]])  # N·s: var 0, 1.08, .12
    method = ZeroTPrune(keep=Fraction(1, 2), head_filter=(0.1, 1.5))
    assert torch.allclose(reference.combine_heads(s, method), (s[0, 1:] ** 2).mean(0).sqrt())
    plain = ZeroTPrune(keep=Fraction(1, 2), eir=False, head_filter=None)
    assert torch.allclose(reference.combine_heads(s, plain), s[0].mean(0))
    nothing = ZeroTPrune(keep=Fraction(1, 2), eir=False, head_filter=(2, 3))
    assert torch.allclose(reference.combine_heads(s, nothing), s[0].mean(0))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zerotprune()", "exactly one of them"),
        ("zerotprune(keep=0.5, threshold=1.0)", "exactly one of them"),
        ("zerotprune(keep=0)", r"keep must be in \(0, 1\]"),
        ("zerotprune(keep=0.5, iterations=0)", "iterations must be an int in 1..100"),
        ("zerotprune(keep=0.5, similar=1.5)", r"similar must be in \(0, 1\]"),
        ("zerotprune(keep=0.5, head_filter=[0.7, 0.1])", "head_filter must be"),
        ("zerotprune(keep=0.5, eir=1)", "eir must be true or false"),
        ("zerotprune(threshold=-1)", "threshold must be >= 0"),
        ("zerotprune(keep=0.5, layers=[])", "layers must be a non-empty list"),
    ],
)
def test_bad_arguments(text, message):
    with pytest.raises(MethodSpecError, match=message):
        parse_methods(text)


def test_plan_and_bench(timm_tiny, pruned):
    path, built = timm_tiny
    base, zerot, topk = plan(str(path), ["zerotprune(keep=0.7, layers=[3,6,9])", "topk(keep=0.7, layers=[3,6,9])"])
    assert zerot.tokens_per_block == topk.tokens_per_block and zerot.final_tokens == 19
    assert topk.gmacs < zerot.gmacs < base.gmacs  # the power iterations and the S-stage are counted
    assert 1.1 < zerot.limit_speedup < topk.limit_speedup
    with pytest.raises(MethodSpecError, match="data-dependent"):
        plan(str(path), ["zerotprune(threshold=1.0)"])
    report = pruned.bench(batches=[1], warmup=0, blocks=1, per_block=1, save=False)
    assert report.rows and report.rows[0].limit_speedup == pytest.approx(zerot.limit_speedup, abs=1e-4)
    assert_parity(pruned, built)
