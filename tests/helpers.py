"""Shared test data (tiny HF configs) and parity assertions."""

from __future__ import annotations

from pathlib import Path

import tokensieve

# Small but real Hugging Face vision-tower configs (hidden size, depth and image size cut down).
HF_TINY = {
    "vit": {
        "model_type": "vit",
        "hidden_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "image_size": 224,
        "patch_size": 16,
    },
    "clip": {
        "model_type": "clip_vision_model",
        "hidden_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "image_size": 224,
        "patch_size": 16,
    },
    "siglip": {
        "model_type": "siglip_vision_model",
        "hidden_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 3,
        "intermediate_size": 768,
        "image_size": 224,
        "patch_size": 16,
    },
    "dinov2": {
        "model_type": "dinov2",
        "hidden_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 3,
        "mlp_ratio": 4,
        "image_size": 224,
        "patch_size": 14,
    },
    "dinov2_reg": {
        "model_type": "dinov2_with_registers",
        "hidden_size": 192,
        "num_hidden_layers": 6,
        "num_attention_heads": 3,
        "mlp_ratio": 4,
        "image_size": 224,
        "patch_size": 14,
        "num_register_tokens": 4,
    },
}


def assert_parity(artifact, built, *, batch: int | None = None, tolerance: float = 1e-4, lint_target="trt10.3"):
    """Values and kept-token sets match the eager reference; the graph is lint-clean."""
    report = artifact.parity(reference=built, batch=batch, tolerance=tolerance, golden=False)
    assert report.ok, report.text()
    assert [s.layer for s in report.sites] == [s["layer"] for s in artifact.manifest["sites"]]
    assert all(s.samples >= 1 and s.ok for s in report.sites)
    lint = artifact.lint(lint_target)
    assert lint.ok, lint.text()
    return report


def export_and_check(zoo_entry, method: str, out: Path, **kwargs):
    path, built = zoo_entry
    artifact = tokensieve.export(str(path), method, out)
    assert_parity(artifact, built, **kwargs)
    return artifact


def save_llava_checkpoint(model, tokenizer, directory: Path) -> None:
    """Save a llava-tiny-geometry model as a local checkpoint directory (weights, tokenizer, image processor)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    LlavaImageProcessorPil(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}).save_pretrained(
        directory
    )
