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
Hugging Face ``generate`` at ``keep=1``) instead, and also on the kept positions: identical sets; ATP-LLaVA
artifacts likewise to :mod:`tokensieve.reference.atp_llava`, on the positions every cut keeps, and DyVTE artifacts
to :mod:`tokensieve.reference.dyvte`. MustDrop artifacts are held to :mod:`tokensieve.reference.mustdrop` (its
shortened prompt ids included) on the vision windows merged, the key set and every cut's positions. Artifacts with
GlobalCom² are held to :mod:`tokensieve.reference.globalcom2`
(its shortened prompt ids included), also on the vision tokens kept, in prompt order: identical. Artifacts with
StreamingLLM are held to the eager StreamingLLM reference (:mod:`tokensieve.reference.streamingllm`) with the
artifact's cache capacity as the budget. Artifacts with SnapKV or A2SF are held to the eager reference
(:mod:`tokensieve.reference.prompt_cache`), also on the positions every layer and KV head keeps: identical sets.
Artifacts with H2O are held to :mod:`tokensieve.reference.h2o`, also on the prompt positions prefill keeps and the
positions cached at the end of the generation, per layer and KV head: identical sets.

The eager side of every case (prompt, image, prompt ids, prefill logits, greedy ids, kept positions) is recorded in
``DIR/golden/cases.npz``; :func:`replay_llava_golden` holds the artifact to it again without torch or the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tokensieve.errors import ParityError, check_at_least
from tokensieve.parity.report import read_golden, save_arrays, write_golden
from tokensieve.runtimes.llava import image_template, listed_images

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
CASES = "cases.npz"


@dataclass
class LlavaParityCase:
    prompt: str
    image_size: list[int]  # of the first image ([0, 0]: text only)
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
    kept_tokens: int | None = None  # FastV, ATP-LLaVA, DyVTE, MustDrop: positions kept after the (last) cut;
    # SnapKV/A2SF: per layer and KV head; H2O: prefill's plus the end's, per layer and KV head
    kept_match: bool | None = None  # the graph's kept positions equal the eager reference's (every cut's)
    images: int = 1  # images in the prompt

    def ok(self, tolerance: float) -> bool:
        kept = self.kept_match is not False
        return self.prompt_ids_match and self.tokens_match and kept and self.logits_error <= tolerance


@dataclass
class LlavaParityReport:
    cases: list[LlavaParityCase]
    tolerance: float
    golden: str | None = None  # where the eager side was recorded (or replayed from)
    reference: str = "Hugging Face eager"

    @property
    def ok(self) -> bool:
        return all(c.ok(self.tolerance) for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tolerance": self.tolerance,
            "reference": self.reference,
            "golden": self.golden,
            "cases": [asdict(c) for c in self.cases],
        }

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
        lines.append(
            f"parity {'OK' if self.ok else 'FAILED'} against {self.reference} (logits tolerance {self.tolerance:g})"
        )
        if self.golden:
            lines.append(f"golden files: {self.golden}")
        return "\n".join(lines)


def _same(kept: np.ndarray | None, reference: np.ndarray | None) -> bool | None:
    """Whether the graph kept the reference's positions (None when the method keeps no positions)."""
    return None if reference is None else kept is not None and np.array_equal(kept, reference)


def _hf_processor(host: dict[str, Any], tokenizer):
    """The Hugging Face processor of the artifact's family (:mod:`tokensieve.converters.families`)."""
    from tokensieve.converters.families import family_of

    return family_of(host["kind"]).hf_processor(host, tokenizer)


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


@dataclass
class Expected:
    """The eager side of one case: what the artifact must reproduce (also what ``golden/cases.npz`` records)."""

    prompt: str
    image: np.ndarray | list[np.ndarray] | None  # uint8 [H, W, 3] (a list: several images); None: text only
    prompt_ids: np.ndarray  # after placeholder expansion
    logits: np.ndarray  # last prompt position
    ids: list[int]  # greedy new tokens, EOS ignored
    kept: np.ndarray | None  # positions the method keeps (see kept_positions), None for methods that keep none


def _expected(model, processor, host: dict, method, capacity: int, prompt: str, image, new_tokens: int):
    import torch

    from tokensieve.reference import FACES
    from tokensieve.reference.decoding import sequence_rope

    images = listed_images(image)  # the template's placeholder once per image (none: its line left out)
    placeholder = host.get("placeholder", getattr(processor, "image_token", "<image>"))
    text = image_template(host["template"], placeholder, len(images)).replace("{prompt}", prompt)
    inputs = processor(text=text, return_tensors="pt", **({"images": image} if images else {}))
    prompt_ids = inputs["input_ids"][0].numpy()
    if method is None:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].numpy()
            generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=0)
        return Expected(prompt, image, prompt_ids, logits, generated[0, len(prompt_ids) :].tolist(), None)
    with sequence_rope(model, inputs):  # mRoPE: the references' sequence indices rotate at the model's positions
        result = FACES.lookup("reference", method)(model, inputs, method, new_tokens, capacity)
    if method.shortens_prompt:  # the image run is shortened to the kept (MustDrop: merged) features
        prompt_ids = result.prompt_ids.numpy()
    kept = kept_positions(result, method)
    return Expected(prompt, image, prompt_ids, result.prefill_logits.numpy(), list(result.ids), kept)


def kept_positions(result, method) -> np.ndarray | None:
    """What parity compares, from an eager reference's result or a :class:`Generation` alike (same field names):
    the method's ``kept_fields`` (a list field: each element), concatenated along the last axis, or with
    ``kept_separated`` each part ended by -1 (MustDrop: merged windows, key set, every cut's positions)."""
    if method is None or not method.kept_fields:
        return None
    parts = []
    for name in method.kept_fields:
        value = getattr(result, name)
        parts.extend(value if isinstance(value, list) else [value])
    arrays = [np.asarray(part) for part in parts]
    if method.kept_separated:
        return np.concatenate([np.append(np.asarray(part, np.int64), -1) for part in arrays])
    return np.concatenate(arrays, -1)


def _compare(runner, cache: str, case: Expected, method) -> LlavaParityCase:
    out = runner.generate(case.image, case.prompt, len(case.ids), ignore_eos=True)
    kept = out.kept_positions if method is None else kept_positions(out, method)
    same_prompt = out.prompt_ids.shape == case.prompt_ids.shape and bool((out.prompt_ids == case.prompt_ids).all())
    mismatch = next((i for i, (a, b) in enumerate(zip(out.ids, case.ids, strict=False)) if a != b), None)
    if mismatch is None and len(out.ids) != len(case.ids):
        mismatch = min(len(out.ids), len(case.ids))
    scale = float(np.abs(case.logits).max()) or 1.0
    images = listed_images(case.image)
    return LlavaParityCase(
        prompt=case.prompt,
        image_size=list(images[0].shape[:2]) if images else [0, 0],
        images=len(images),
        cache=cache,
        prompt_tokens=len(case.prompt_ids),
        image_tokens=sum(end - start for start, end in out.image_runs),
        prompt_ids_match=same_prompt,
        logits_error=float(np.abs(out.prefill_logits - case.logits).max()) / scale,
        new_tokens=len(case.ids),
        tokens_match=mismatch is None,
        first_mismatch=mismatch,
        reference_ids=list(case.ids),
        ids=out.ids,
        kept_tokens=len(out.kept_positions) if out.cut_positions else None if kept is None else kept.shape[-1],
        kept_match=_same(kept, case.kept),
    )


def _runners(artifact, caches: tuple[str, ...]) -> dict:
    caches = tuple(c for c in caches if c == "fixed" or "decode_growing" in artifact.manifest.graphs)
    return {cache: artifact.llava_runner(cache=cache) for cache in caches}


def _method(artifact):
    """The artifact's decoder method (an MLLM artifact has one at most), or None."""
    from tokensieve.methods import methods_from_dicts

    return next(iter(methods_from_dicts(artifact.manifest.methods)), None)


def check_llava_parity(
    artifact,
    *,
    cases: list[tuple[str, np.ndarray]] | None = None,
    count: int = 4,
    new_tokens: int = 32,
    caches: tuple[str, ...] = ("fixed", "growing"),
    seed: int = 0,
    tolerance: float = 1e-4,
    golden: bool = True,
) -> LlavaParityReport:
    """Compare ``artifact`` (an MLLM artifact) with Hugging Face eager on ``cases`` (default: ``count`` random);
    with ``golden``, record the eager side in ``DIR/golden/cases.npz`` for :func:`replay_llava_golden`."""
    from transformers import AutoTokenizer

    from tokensieve.converters.families import build_mllm
    from tokensieve.converters.sources import SourceSpec, weights_digest

    check_at_least("new_tokens", new_tokens, 1)
    if cases is None:
        check_at_least("cases", count, 1)
    manifest = artifact.manifest
    spec = SourceSpec.from_dict(manifest.source)
    built = build_mllm(spec.name, spec.seed)
    if weights_digest(built.model) != manifest.weights_sha256:
        raise ParityError(
            f"the eager model rebuilt from {spec.text} does not have the weights the artifact was exported with "
            "(different seed, checkpoint or library version); re-export the artifact"
        )
    model = built.model
    model.generation_config.eos_token_id = None  # generate exactly new_tokens, like ignore_eos on our side
    tokenizer = AutoTokenizer.from_pretrained(artifact.path / "tokenizer")
    processor = _hf_processor(manifest.host, tokenizer)
    method = _method(artifact)
    runners = _runners(artifact, caches)
    capacity = manifest.decoder["capacity"]
    expected = [
        _expected(model, processor, manifest.host, method, capacity, prompt, image, new_tokens)
        for prompt, image in cases or default_cases(manifest.host, count, seed)
    ]
    results = [_compare(runner, cache, case, method) for case in expected for cache, runner in runners.items()]
    report = LlavaParityReport(results, tolerance)
    if golden:
        report.golden = str(_write_golden(artifact.path, expected))
    return report


def _write_golden(directory, expected: list[Expected]):
    arrays = {}
    for i, case in enumerate(expected):
        if isinstance(case.image, list):  # several images
            arrays |= {f"{i}/image_{j}": image for j, image in enumerate(case.image)}
        arrays |= {
            f"{i}/prompt": np.array(case.prompt),
            f"{i}/image": case.image if isinstance(case.image, np.ndarray) else np.zeros((0, 0, 3), np.uint8),
            f"{i}/prompt_ids": case.prompt_ids,
            f"{i}/logits": case.logits,
            f"{i}/ids": np.array(case.ids, np.int64),
        }
        if case.kept is not None:
            arrays[f"{i}/kept"] = case.kept
    return write_golden(directory, save_arrays(CASES, arrays))


def replay_llava_golden(
    artifact, *, caches: tuple[str, ...] = ("fixed", "growing"), tolerance: float = 1e-4
) -> LlavaParityReport:
    """Repeat the parity check from ``DIR/golden/cases.npz`` alone (torch-free, no Hugging Face model): the recorded
    prompts and images through the artifact on ONNX Runtime, held to the recorded prompt ids, prefill logits,
    greedy tokens and kept positions."""
    expected = read_golden(artifact, (CASES,), _read_cases)
    method, runners = _method(artifact), _runners(artifact, caches)
    results = [_compare(runner, cache, case, method) for case in expected for cache, runner in runners.items()]
    return LlavaParityReport(results, tolerance, golden=str(artifact.path / "golden"), reference="golden eager outputs")


def _read_cases(golden) -> list[Expected]:
    with np.load(golden / CASES) as data:
        return [
            Expected(
                str(data[f"{i}/prompt"]),
                _golden_image(data, i),
                data[f"{i}/prompt_ids"],
                data[f"{i}/logits"],
                data[f"{i}/ids"].tolist(),
                data[f"{i}/kept"] if f"{i}/kept" in data.files else None,
            )
            for i in range(len({k.split("/")[0] for k in data.files}))
        ]


def _golden_image(data, case: int) -> np.ndarray | list[np.ndarray] | None:
    """A recorded case's image: one array, a list of them (``<case>/image_<j>``), or None (text only)."""
    if data[f"{case}/image"].size:
        return data[f"{case}/image"]
    images = []
    while f"{case}/image_{len(images)}" in data.files:
        images.append(data[f"{case}/image_{len(images)}"])
    return images or None
