"""Parity of an MLLM artifact with Hugging Face eager: same prompt ids, same prefill logits, same greedy tokens.

For each case (a random prompt and a random image of a given size; several aspect ratios, so LLaVA-NeXT's grid
selection, unpadding and newline packing are exercised) the reference side is pure Hugging Face: the model rebuilt
from the manifest's source (its weights checked against the recorded hash), the PIL image processor and the
``LlavaProcessor`` / ``LlavaNextProcessor`` (placeholder expansion), ``model(...)`` for the prefill logits and
``model.generate(do_sample=False)`` with EOS disabled for the tokens. The tokensieve side is the artifact on ONNX
Runtime through :class:`tokensieve.runtimes.llava.LlavaRunner`, with each requested cache form.

Checked per case: the runtime's prompt ids (after placeholder expansion) equal the processor's, the last-position
prefill logits agree within ``tolerance`` relative to their scale, and the ``new_tokens`` greedy ids are identical.

Artifacts with FastV are held to the eager FastV reference (:mod:`tokensieve.reference.fastv`, itself equal to
Hugging Face ``generate`` at ``keep=1``) instead, and also on the kept positions: identical sets. Artifacts with
StreamingLLM are held to the eager StreamingLLM reference (:mod:`tokensieve.reference.streamingllm`) with the
artifact's cache capacity as the budget. Artifacts with SnapKV or A2SF are held to the eager reference
(:mod:`tokensieve.reference.prompt_cache`), also on the positions every layer and KV head keeps: identical sets.
Artifacts with H2O are held to :mod:`tokensieve.reference.h2o`, also on the prompt positions prefill keeps and the
positions cached at the end of the generation, per layer and KV head: identical sets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tokensieve.errors import ParityError

_WORDS = (
    "what",
    "is",
    "shown",
    "in",
    "this",
    "image",
    "describe",
    "the",
    "colors",
    "and",
    "shapes",
    "count",
    "objects",
    "where",
    "left",
    "right",
    "a",
    "photo",
    "of",
    "scene",
    "please",
    "briefly",
    "detail",
)
# image sizes as multiples of the vision input side: square, wide, tall, large (NeXT picks different grids)
_ASPECTS = ((1.0, 1.0), (0.8, 1.8), (2.7, 1.1), (2.0, 2.0))


@dataclass
class LlavaParityCase:
    prompt: str
    image_size: list[int]
    cache: str
    prompt_tokens: int
    image_tokens: int
    prompt_ids_match: bool
    logits_error: float  # max |diff| / max |reference logit|
    new_tokens: int
    tokens_match: bool
    first_mismatch: int | None
    reference_ids: list[int] = field(repr=False)
    ids: list[int] = field(repr=False)
    kept_tokens: int | None = None  # FastV: prompt positions later layers keep; SnapKV/A2SF: per layer and KV head;
    # H2O: prefill's plus the end's, per layer and KV head
    kept_match: bool | None = None  # the graph's kept positions equal the eager reference's

    def ok(self, tolerance: float) -> bool:
        kept = self.kept_match is not False
        return self.prompt_ids_match and self.tokens_match and kept and self.logits_error <= tolerance


@dataclass
class LlavaParityReport:
    cases: list[LlavaParityCase]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(c.ok(self.tolerance) for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "tolerance": self.tolerance, "cases": [asdict(c) for c in self.cases]}

    def text(self) -> str:
        lines = [
            f"{'image':>9} {'cache':>7} {'prompt':>6} {'image tok':>9} {'ids':>4} {'kept':>9} {'logits err':>10} tokens"
        ]
        for c in self.cases:
            tokens = f"{c.new_tokens} identical" if c.tokens_match else f"differ at {c.first_mismatch}"
            kept = "-" if c.kept_match is None else f"{c.kept_tokens} {'ok' if c.kept_match else 'DIFF'}"
            lines.append(
                f"{c.image_size[0]:>4}x{c.image_size[1]:<4} {c.cache:>7} {c.prompt_tokens:>6} {c.image_tokens:>9} "
                f"{'ok' if c.prompt_ids_match else 'DIFF':>4} {kept:>9} {c.logits_error:>10.2e} {tokens}"
            )
        lines.append(f"parity {'OK' if self.ok else 'FAILED'} (logits tolerance {self.tolerance:g})")
        return "\n".join(lines)


def _same(kept: np.ndarray | None, reference: np.ndarray | None) -> bool | None:
    """Whether the graph kept the reference's positions (None when the method keeps no positions)."""
    return None if reference is None else kept is not None and np.array_equal(kept, reference)


def _hf_processor(host: dict[str, Any], tokenizer):
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    common = {
        "size": {"shortest_edge": host["shortest_edge"]},
        "crop_size": {"height": host["crop"][0], "width": host["crop"][1]},
        "image_mean": host["mean"],
        "image_std": host["std"],
    }
    if host["kind"] == "llava_next":
        images, cls = (
            LlavaNextImageProcessorPil(image_grid_pinpoints=host["grid_pinpoints"], **common),
            LlavaNextProcessor,
        )
    else:
        images, cls = LlavaImageProcessorPil(do_pad=host["do_pad"], **common), LlavaProcessor
    extra = 1 if host["select_strategy"] == "default" else 0  # the CLS token the "default" strategy drops
    return cls(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=host["patch_size"],
        vision_feature_select_strategy=host["select_strategy"],
        num_additional_image_tokens=extra,
    )


def default_cases(host: dict[str, Any], count: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """``count`` (prompt, image) pairs: random words, random uint8 images cycling through the aspect ratios."""
    rng = np.random.default_rng(seed)
    side = host["image_size"]
    cases = []
    for i in range(count):
        words = rng.choice(_WORDS, size=int(rng.integers(3, 9)))
        prompt = " ".join(words).capitalize() + "?"
        h, w = (max(8, int(side * f)) for f in _ASPECTS[i % len(_ASPECTS)])
        cases.append((prompt, rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return cases


def check_llava_parity(
    artifact,
    *,
    cases: list[tuple[str, np.ndarray]] | None = None,
    count: int = 4,
    new_tokens: int = 32,
    caches: tuple[str, ...] = ("fixed", "growing"),
    seed: int = 0,
    tolerance: float = 1e-4,
) -> LlavaParityReport:
    """Compare ``artifact`` (an MLLM artifact) with Hugging Face eager on ``cases`` (default: ``count`` random)."""
    import torch
    from transformers import AutoTokenizer

    from tokensieve.converters.llava import build_llava
    from tokensieve.converters.sources import SourceSpec, weights_digest
    from tokensieve.methods import methods_from_dicts
    from tokensieve.reference.fastv import fastv_generate
    from tokensieve.reference.h2o import h2o_generate
    from tokensieve.reference.prompt_cache import compressed_generate
    from tokensieve.reference.streamingllm import streaming_generate

    manifest = artifact.manifest
    spec = SourceSpec.from_dict(manifest["source"])
    built = build_llava(spec.name, spec.seed)
    if weights_digest(built.model) != manifest["weights_sha256"]:
        raise ParityError(
            f"the eager model rebuilt from {spec.text} does not have the weights the artifact was exported with "
            "(different seed, checkpoint or library version); re-export the artifact"
        )
    model = built.model
    model.generation_config.eos_token_id = None  # generate exactly new_tokens, like ignore_eos on our side
    tokenizer = AutoTokenizer.from_pretrained(artifact.path / "tokenizer")
    processor = _hf_processor(manifest["host"], tokenizer)
    caches = tuple(c for c in caches if c == "fixed" or "decode_growing" in manifest["graphs"])
    runners = {cache: artifact.llava_runner(cache=cache) for cache in caches}
    results = []
    template = manifest["host"]["template"]
    methods = {m.name: m for m in methods_from_dicts(manifest.get("methods"))}
    fastv, streaming = methods.get("fastv"), methods.get("streamingllm")
    compression = methods.get("snapkv") or methods.get("a2sf")
    h2o = methods.get("h2o")
    for prompt, image in cases or default_cases(manifest["host"], count, seed):
        inputs = processor(images=image, text=template.format(prompt=prompt), return_tensors="pt")
        reference_prompt = inputs["input_ids"][0].numpy()
        reference_kept = None
        if fastv is not None:
            result = fastv_generate(model, inputs, fastv, new_tokens)
            reference_logits, reference_ids = result.prefill_logits.numpy(), result.ids
            reference_kept = result.kept_positions.numpy()
        elif h2o is not None:
            result = h2o_generate(model, inputs, h2o, new_tokens)
            reference_logits, reference_ids = result.prefill_logits.numpy(), result.ids
            reference_kept = np.concatenate([result.cache_positions.numpy(), result.retained_positions.numpy()], -1)
        elif compression is not None:
            result = compressed_generate(model, inputs, compression, new_tokens)
            reference_logits, reference_ids = result.prefill_logits.numpy(), result.ids
            reference_kept = result.cache_positions.numpy()
        elif streaming is not None:
            result = streaming_generate(model, inputs, streaming, manifest["decoder"]["capacity"], new_tokens)
            reference_logits, reference_ids = result.prefill_logits.numpy(), result.ids
        else:
            with torch.no_grad():
                reference_logits = model(**inputs).logits[0, -1].numpy()
                generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=0)
            reference_ids = generated[0, len(reference_prompt) :].tolist()
        for cache, runner in runners.items():
            out = runner.generate(image, prompt, new_tokens, ignore_eos=True)
            kept = out.cache_positions if compression is not None else out.kept_positions
            if h2o is not None:  # the prompt positions kept by prefill, then what the cache holds at the end
                kept = np.concatenate([out.cache_positions, out.retained_positions], -1)
            same_prompt = out.prompt_ids.shape == reference_prompt.shape and bool(
                (out.prompt_ids == reference_prompt).all()
            )
            mismatch = next((i for i, (a, b) in enumerate(zip(out.ids, reference_ids, strict=False)) if a != b), None)
            if mismatch is None and len(out.ids) != len(reference_ids):
                mismatch = min(len(out.ids), len(reference_ids))
            scale = float(np.abs(reference_logits).max()) or 1.0
            results.append(
                LlavaParityCase(
                    prompt=prompt,
                    image_size=list(image.shape[:2]),
                    cache=cache,
                    prompt_tokens=len(reference_prompt),
                    image_tokens=0 if out.image_span is None else out.image_span[1] - out.image_span[0],
                    prompt_ids_match=same_prompt,
                    logits_error=float(np.abs(out.prefill_logits - reference_logits).max()) / scale,
                    new_tokens=len(reference_ids),
                    tokens_match=mismatch is None,
                    first_mismatch=mismatch,
                    reference_ids=reference_ids,
                    ids=out.ids,
                    kept_tokens=None if kept is None else kept.shape[-1],
                    kept_match=_same(kept, reference_kept),
                )
            )
    return LlavaParityReport(results, tolerance)
