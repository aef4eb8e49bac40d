"""The eager reference: exact where nothing is pruned, ONNX-TopK tie-breaking, batch == loop over samples."""

import json

import pytest
import torch
from helpers import HF_TINY

from tokensieve.converters.sources import build_module, parse_source
from tokensieve.methods import parse_method
from tokensieve.reference.adapters import AttentionTensors, find_blocks
from tokensieve.reference.topk import TopKReference, score, select


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
    reference = TopKReference(built.module, parse_method("topk(keep=1.0, layers=[0, 1])"))
    for a, b in zip(_run(built.module, x), _run(reference, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert set(reference.recorder.kept) == {0, 1}


def test_reference_does_not_touch_the_original(models):
    built = models["timm:deit3_small_patch16_224"]
    TopKReference(built.module, parse_method("topk(keep=0.5, layers=[1])"))
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
    torch.testing.assert_close(cls.sum(-1), torch.ones(2))
    received = score(AttentionTensors(q, k, 8**-0.5), "mean_received")
    torch.testing.assert_close(received.sum(-1), torch.ones(2))


@pytest.mark.parametrize("method", ["topk(keep=0.5, layers=[0, 1], fuse=true)", "topk(keep=0.3, layers=[1])"])
def test_batched_equals_loop_over_samples(models, method):
    built = models["timm:vit_small_patch14_reg4_dinov2"]
    reference = TopKReference(built.module, parse_method(method))
    x = torch.randn(3, *built.input_shape)
    (batched,) = _run(reference, x)
    kept = {k: v.clone() for k, v in reference.recorder.kept.items()}
    for i in range(3):
        (single,) = _run(reference, x[i : i + 1])
        torch.testing.assert_close(single[0], batched[i], rtol=1e-4, atol=1e-4)
        for layer, idx in reference.recorder.kept.items():
            assert idx[0].tolist() == kept[layer][i].tolist()
    assert all(v.shape[1] == v.unique(dim=1).shape[1] for v in kept.values())
