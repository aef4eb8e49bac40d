"""The eager reference: exact where nothing is reduced, ONNX-TopK tie-breaking, batch == loop over samples,
proportional attention really applied."""

import json

import pytest
import torch
from helpers import HF_TINY

from tokensieve.converters.sources import build_module, parse_source
from tokensieve.methods import parse_methods
from tokensieve.reference.adapters import AttentionTensors, find_blocks
from tokensieve.reference.merging import merge_into
from tokensieve.reference.reduce import ReducedModel
from tokensieve.reference.topk import score, select


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}
    for name in ("timm:deit3_small_patch16_224", "timm:vit_small_patch14_reg4_dinov2"):
        built[name] = build_module(parse_source(name, img_size=224 if "dinov2" in name else None))
    for family, config in HF_TINY.items():
        directory = tmp_path_factory.mktemp(family)
        (directory / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
        built[family] = build_module(parse_source(f"hf:{directory}"))
    return built


def _run(module, x):
    with torch.no_grad():
        out = module(x)
    return out if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("name", ["timm:deit3_small_patch16_224", "timm:vit_small_patch14_reg4_dinov2", *HF_TINY])
def test_keep_all_reproduces_the_model(models, name):
    built = models[name]
    x = torch.randn(2, *built.input_shape)
    reference = ReducedModel(built.module, parse_methods("topk(keep=1.0, layers=[0, 1])"))
    for a, b in zip(_run(built.module, x), _run(reference, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert set(reference.records) == {0, 1}


@pytest.mark.parametrize("name", ["timm:deit3_small_patch16_224", "siglip", "dinov2_reg"])
def test_proportional_attention_is_applied(models, name):
    """With sizes all equal to 1 the bias is 0; after a merge, prop_attn on vs off must change the outputs."""
    built = models[name]
    x = torch.randn(1, *built.input_shape)
    on = _run(ReducedModel(built.module, parse_methods("tome(r=4, layers=[0])")), x)[0]
    off = _run(ReducedModel(built.module, parse_methods("tome(r=4, layers=[0], prop_attn=false)")), x)[0]
    assert (on - off).abs().max() > 1e-4


def test_reference_does_not_touch_the_original(models):
    built = models["timm:deit3_small_patch16_224"]
    ReducedModel(built.module, parse_methods("tome(r=8)"))
    assert all(type(b).__name__ == "Block" for b in find_blocks(built.module)[1])


def test_ties_pick_lower_index_first():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.9, 0.1]])
    assert select(scores, 3).tolist() == [[0, 1, 4]]
    assert select(scores, 4).tolist() == [[0, 1, 2, 4]]


def test_scores_are_cls_row_probabilities():
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8)
    cls = score(AttentionTensors(q, k, 8**-0.5), "cls")
    expected = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) * 8**-0.5, -1).mean(1)[:, 0]
    torch.testing.assert_close(cls, expected)
    received = score(AttentionTensors(q, k, 8**-0.5), "mean_received")
    torch.testing.assert_close(received.sum(-1), torch.ones(2))
    bias = torch.log(torch.arange(1, 11, dtype=torch.float32))[None, None, None, :]
    biased = score(AttentionTensors(q, k, 8**-0.5, bias), "cls")
    expected = torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) * 8**-0.5 + bias, -1).mean(1)[:, 0]
    torch.testing.assert_close(biased, expected)


def test_merge_rules():
    dst, src = torch.tensor([[[1.0], [10.0]]]), torch.tensor([[[3.0], [5.0], [7.0]]])
    assign = torch.tensor([[0, 0, 1]])
    weighted, sizes = merge_into(dst, torch.tensor([[1.0, 2.0]]), src, torch.tensor([[1.0, 1.0, 2.0]]), assign)
    assert sizes.tolist() == [[3.0, 4.0]]
    assert weighted[0, :, 0].tolist() == [pytest.approx(3.0), pytest.approx((20 + 14) / 4)]
    mean, _ = merge_into(dst, torch.ones(1, 2), src, torch.ones(1, 3), assign, unweighted=True)
    assert mean[0, :, 0].tolist() == [pytest.approx(3.0), pytest.approx(8.5)]


@pytest.mark.parametrize(
    "method",
    ["topk(keep=0.5, layers=[0, 1], fuse=true)", "topk(keep=0.3, layers=[1])", "tome(r=20)", "pitome(ratio=0.8)"],
)
def test_batched_equals_loop_over_samples(models, method):
    built = models["timm:vit_small_patch14_reg4_dinov2"]
    reference = ReducedModel(built.module, parse_methods(method))
    x = torch.randn(3, *built.input_shape, generator=torch.Generator().manual_seed(0))  # fixed: near-ties differ
    (batched,) = _run(reference, x)
    records = {layer: {k: v.clone() for k, v in rec.items()} for layer, rec in reference.records.items()}
    for i in range(3):
        (single,) = _run(reference, x[i : i + 1])
        torch.testing.assert_close(single[0], batched[i], rtol=1e-4, atol=1e-4)
        for layer, rec in reference.records.items():
            for role, value in rec.items():
                torch.testing.assert_close(value[0], records[layer][role][i], rtol=1e-5, atol=1e-5)
