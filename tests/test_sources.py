"""Model sources: local checkpoints (no hub), deterministic random weights, and their errors."""

import pytest
import torch

import tokensieve
from tokensieve.converters.init import randomize_weights
from tokensieve.converters.sources import build_module, parse_source, weights_digest
from tokensieve.errors import SourceError


def test_random_weights_are_deterministic_and_realistic():
    a = build_module(parse_source("timm:deit3_small_patch16_224", seed=3))
    b = build_module(parse_source("timm:deit3_small_patch16_224", seed=3))
    c = build_module(parse_source("timm:deit3_small_patch16_224", seed=4))
    assert weights_digest(a.module) == weights_digest(b.module) != weights_digest(c.module)
    gamma = a.module.blocks[0].ls1.gamma
    assert gamma.min() >= 0.1 and gamma.max() <= 0.5  # LayerScale is visible, not 1e-5


def test_timm_checkpoint_file_round_trip(tmp_path):
    built = build_module(parse_source("timm:vit_small_patch16_224"))
    randomize_weights(built.module, seed=123)
    checkpoint = tmp_path / "vit_small.pth"
    torch.save(built.module.state_dict(), checkpoint)
    artifact = tokensieve.export(
        "timm:vit_small_patch16_224", "topk(keep=0.5, layers=[4])", tmp_path / "a", weights=str(checkpoint)
    )
    assert artifact.manifest.source["weights"] == str(checkpoint)
    assert artifact.manifest.weights_sha256 == weights_digest(built.module)
    assert artifact.parity(golden=False).ok  # parity reloads the checkpoint from its path


def test_hf_checkpoint_directory(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=96, num_hidden_layers=3, num_attention_heads=2, image_size=112, patch_size=14)
    model = Dinov2Model(config)
    randomize_weights(model, seed=7)
    model.save_pretrained(tmp_path / "ckpt")
    artifact = tokensieve.export(f"hf:{tmp_path / 'ckpt'}", "topk(keep=0.5, layers=[1])", tmp_path / "a")
    report = artifact.parity(golden=False)
    assert report.ok, report.text()
    assert artifact.manifest.tokens_per_block["model"] == [65, 65, 33]


def test_bad_weights_file(tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SourceError, match="cannot load weights"):
        build_module(parse_source("timm:vit_small_patch16_224", weights=str(bad)))
    with pytest.raises(SourceError, match="does not exist"):
        parse_source("timm:vit_small_patch16_224", weights=str(tmp_path / "missing.pth"))


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')
    with pytest.raises(SourceError, match=r"is not supported; vision towers: .*MLLMs: llava"):
        build_module(parse_source(f"hf:{tmp_path}"))


def test_weights_digest_takes_scalar_buffers():
    """BatchNorm's 0-dim ``num_batches_tracked`` (hybrid ViTs, XCiT) is hashed like any tensor."""
    import torch

    first, second = torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    assert weights_digest(first) == weights_digest(second)
    second.num_batches_tracked += 1
    assert weights_digest(first) != weights_digest(second)
