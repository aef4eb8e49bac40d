"""Shared test data (tiny HF configs) and parity assertions."""

from __future__ import annotations

from pathlib import Path

import tokensieve

# Small but real Hugging Face vision-tower configs (hidden size, depth and image size cut down).
_SMALL = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 128,
          "image_size": 96, "patch_size": 16}  # fmt: skip
_RELPOS = {"use_relative_position_bias": True, "use_shared_relative_position_bias": True}
HF_TINY = {
    "deit": {"model_type": "deit", **_SMALL},  # CLS + distillation token, ViT's layers
    "ijepa": {"model_type": "ijepa", **_SMALL},  # no CLS token, no pooling layer
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
    # rotary (cos, sin) over the patches passed to every layer, CLS + 4 registers unrotated
    "dinov3": {"model_type": "dinov3_vit", **_SMALL, "num_register_tokens": 4},
    "aimv2": {"model_type": "aimv2_vision_model", **_SMALL},  # RMSNorm, SwiGLU, attention-pooling head
    # the layers' own relative position biases and the model's shared one (BEiT: given as every layer's mask)
    "beit": {"model_type": "beit", **_SMALL, **_RELPOS},
    "data2vec_vision": {"model_type": "data2vec-vision", **_SMALL, **_RELPOS},
    # a dense head: DPT's neck and depth head on four taps of a DINOv2 backbone (4 x 4 patches)
    "dpt": {
        "model_type": "dpt",
        "image_size": 56,
        "patch_size": 14,
        "hidden_size": 32,
        "is_hybrid": False,
        "backbone_config": {
            "model_type": "dinov2",
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "mlp_ratio": 2,
            "image_size": 56,
            "patch_size": 14,
            "out_features": ["stage1", "stage2", "stage3", "stage4"],
            "reshape_hidden_states": False,
        },
        "neck_hidden_sizes": [16, 16, 16, 16],
        "reassemble_factors": [4, 2, 1, 0.5],
        "fusion_hidden_size": 16,
        "head_hidden_size": 16,
    },
}


def assert_parity(artifact, built, *, batch: int | None = None, tolerance: float = 1e-4, lint_target="trt10.3"):
    """Values and kept-token sets match the eager reference; the graph is lint-clean."""
    report = artifact.parity(reference=built, batch=batch, tolerance=tolerance, golden=False)
    assert report.ok, report.text()
    assert [s.layer for s in report.sites] == [s["layer"] for s in artifact.manifest.sites]
    assert all(s.samples >= 1 and s.ok for s in report.sites)
    lint = artifact.lint(lint_target)
    assert lint.ok, lint.text()
    return report


def check_staged(artifact, built, batch=3, golden=False):
    """Staged parity in every routing mode and at every first-site bucket edge, and the TensorRT 10.3 lint."""
    report = artifact.parity(reference=built, batch=batch, golden=golden)
    assert report.ok, report.text()
    labels = [c.label for c in report.checks]
    assert any(label.startswith("oracle") for label in labels) and any(label.startswith("padmax") for label in labels)
    sizes = artifact.manifest.stages["buckets"][""]
    exact = [label for label in labels if "exact fit" in label or "largest bucket" in label]
    assert len(exact) == len(sizes)  # every bucket checked at its edge
    lint = artifact.lint("trt10.3")
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
    side = model.config.vision_config.image_size
    LlavaImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        directory
    )


def save_peaked_llava(directory: Path) -> None:
    """llava-tiny with its decoder's query and key projections scaled up, saved as a local checkpoint: random weights
    otherwise give nearly uniform attention, under which the oldest positions always weigh most and an evicting
    cache (H2O, Keyformer) only ever drops the position leaving the recent window. Peaked attention makes prompt
    heavy hitters compete with new tokens."""
    import torch

    from tokensieve.converters.families import build_mllm

    built = build_mllm("llava-tiny")
    with torch.no_grad():
        for layer in built.model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    save_llava_checkpoint(built.model, built.tokenizer, directory)


def save_four_layer_llava(directory: Path, image_size: int = 112) -> None:
    """llava-tiny with 4 decoder layers, saved as a local checkpoint (so a cut at layer 2 has layers on both sides);
    ``image_size=126`` gives a 9 x 9 patch grid (nine 3 x 3 windows for MustDrop's merge)."""
    import transformers

    from tokensieve.converters.families import build_mllm
    from tokensieve.converters.init import randomize_weights

    built = build_mllm("llava-tiny")
    config = built.model.config
    config.text_config.num_hidden_layers = 4
    config.vision_config.image_size = image_size
    config.image_seq_length = (image_size // config.vision_config.patch_size) ** 2
    model = transformers.LlavaForConditionalGeneration(config)
    randomize_weights(model, 3)
    save_llava_checkpoint(model, built.tokenizer, directory)


def hf_greedy_cases(preset: str, count: int, seed: int, new_tokens: int):
    """``(model, processor inputs, HF greedy ids with EOS off, last-position logits)`` for parity's default cases."""
    import torch

    from tokensieve.converters.families import build_mllm
    from tokensieve.parity.mllm import _hf_processor, default_cases

    built = build_mllm(preset)
    model = built.model
    model.generation_config.eos_token_id = None
    processor = _hf_processor(built.host, built.tokenizer)
    for prompt, image in default_cases(built.host, count, seed):
        inputs = processor(images=image, text=built.host["template"].format(prompt=prompt), return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
            generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=0)
        yield model, inputs, generated[0, inputs["input_ids"].shape[1] :].tolist(), logits


def generate_json(directory: Path, image_path: Path, capsys) -> dict:
    """``tokensieve generate DIR --image IMG --prompt What? --json`` on a seeded 100x140 image, parsed."""
    import json

    import numpy as np
    from PIL import Image

    from tokensieve.cli import main

    Image.fromarray(np.random.default_rng(4).integers(0, 256, (100, 140, 3), dtype=np.uint8)).save(image_path)
    capsys.readouterr()
    assert main(["generate", str(directory), "--image", str(image_path), "--prompt", "What?", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_plan_matches_graphs(artifact, text_tokens: int = 20) -> None:
    """``tokensieve plan``'s numbers for the artifact's method (planned from its manifest) are what its graphs
    compute: the vision graph's MACs per crop times the crops, the prefill graph's MACs with its symbolic axes bound
    to the planned prompt, and the fixed decode graph's MACs and cache inputs (bytes) at the artifact's capacity
    (new tokens chosen to need exactly it)."""
    import numpy as np
    import onnx_ir as ir

    from tokensieve.graph_passes.macs import count_macs
    from tokensieve.graph_passes.propagate import propagate_shapes
    from tokensieve.plan.mllm import plan_artifact

    capacity = artifact.manifest.decoder["capacity"]
    prompt, rows = plan_artifact(artifact, text_tokens)
    row, method = rows[-1], artifact.manifest.method_text
    assert row.slots == capacity, (row.slots, capacity)
    assert count_macs(ir.load(artifact.graph_path("vision"))) * prompt.crops == prompt.vision_macs, method
    prefill = ir.load(artifact.graph_path("prefill"))
    dims = {"sequence": prompt.length, "image_tokens": prompt.image_tokens}
    for value in prefill.graph.inputs:
        value.shape = ir.Shape([d if isinstance(d, int) else dims[d.value] for d in value.shape])
    propagate_shapes(prefill)
    assert count_macs(prefill) == row.prefill_macs, method
    decode = ir.load(artifact.graph_path("decode"))
    assert count_macs(decode) == row.decode_macs, method
    names = ("cache_key_", "cache_value_", "h2o_scores", "slot_positions")
    cache_bytes = sum(
        np.prod(v.shape.numpy()) * v.dtype.itemsize for v in decode.graph.inputs if v.name.startswith(names)
    )
    assert cache_bytes == row.cache_mib * 2**20, method


def assert_bench_runs(artifact) -> None:
    """``tokensieve bench`` drives the artifact's decode graphs with its method's inputs (slot groups, ring,
    heavy-hitter state), both caches where the artifact has them, and its prefill (segments and host decisions)
    with the image in the prompt."""
    image = artifact.manifest.image_tokens
    contexts = [8, (image.get("count") or image["per_crop"]) + 10]
    report = artifact.bench(contexts=contexts, warmup=0, blocks=1, per_block=1, save=False)
    growing = "decode_growing" in artifact.manifest.graphs
    assert [r.context for r in report.decode] == contexts
    assert all(r.fixed_ms > 0 and (r.growing_ms is not None) == growing for r in report.decode)
    assert sorted(report.prefill_ms) == contexts and report.vision_ms > 0


def prefill_case(artifact, preset: str, seed: int):
    """One default parity case (prompt and image) of ``preset`` run through ``artifact``'s prefill: ``(built model,
    the HF processor's inputs, prompt ids, present caches, prefill extras)`` (cache-layout checks against eager)."""
    from tokensieve.converters.families import build_mllm
    from tokensieve.parity.mllm import _hf_processor, default_cases
    from tokensieve.runtimes.llava import expand_placeholders

    runner, built = artifact.llava_runner(), build_mllm(preset)
    prompt, image = default_cases(built.host, 1, seed)[0]
    inputs = _hf_processor(built.host, built.tokenizer)(
        images=image, text=built.host["template"].format(prompt=prompt), return_tensors="pt"
    )
    features, ids = runner.image_features(image), inputs["input_ids"][0].numpy()
    ids = expand_placeholders(ids, runner.host["image_token_id"], len(features))
    _, present, extras = runner.prefill(runner.inputs_embeds(ids, features))
    return built, inputs, ids, present, extras
