"""Generation with an MLLM artifact's four graphs on ONNX Runtime: vision, embed, prefill, decode.

The host does what the Hugging Face processor and ``generate`` do around the graphs: preprocess the image
(``llava_image.preprocess``), pack LLaVA-NeXT's crop features, tokenize the prompt, expand the ``<image>``
placeholder to the number of image features, write the features into the token embeddings at the placeholder
positions (found from ``input_ids``), run prefill, then greedy decoding until a stop token or ``max_new_tokens``.

Two cache forms (decoders in :mod:`tokensieve.runtimes.kv_cache`): ``fixed`` (the default; static-shape ``decode``
graph with caches ``[1, H_kv, C, d]`` updated in place, prefill's keys/values copied into slots ``0..T-1``) and
``growing`` (``decode_growing``: past keys/values grow by one position per step). A prompt plus generation longer
than the capacity raises :class:`CapacityError` before anything runs (not with StreamingLLM or H2O, which evict).
With SnapKV / A2SF / H2O the prefill graph returns the compressed prompt cache (``budget`` positions per layer and KV
head) and new tokens are cached after it, at their absolute positions; H2O's decode graph then evicts one position
per step once ``budget + 1`` are cached. With GlobalCom² the image features come from
:func:`tokensieve.runtimes.globalcom2.select_features` instead of the plain AnyRes packing. With ATP-LLaVA, DyVTE or
MustDrop prefill runs as segment graphs with the host's decisions between them (:mod:`tokensieve.runtimes.prefill`);
MustDrop's vision runs as ``vision_0`` -> window merge -> ``vision_1`` and gives the key set
(:mod:`tokensieve.runtimes.mustdrop`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokensieve.errors import ArtifactError, CapacityError, PromptError, RuntimeBackendError
from tokensieve.methods import methods_from_dicts
from tokensieve.methods.decoder import DecoderMethod
from tokensieve.methods.faces import register
from tokensieve.runtimes import FACES
from tokensieve.runtimes.image_families import image_family, pack_features, preprocess
from tokensieve.runtimes.kv_cache import DecodeSetup
from tokensieve.runtimes.ort import OrtRunner, SharedWeights
from tokensieve.runtimes.prefill import Prefill

if TYPE_CHECKING:
    from tokensieve.manifest import MllmManifest

IMAGE_TOKEN = "<image>"
CACHE_MODES = ("fixed", "growing")
VISION = ("vision", "vision_0", "vision_1")  # one graph, or MustDrop's two (before and after the window merge)


@dataclass
class Generation:
    """The result of one :meth:`LlavaRunner.generate` call."""

    ids: list[int]  # new tokens, stop token included
    text: str
    prompt_ids: np.ndarray  # [T]: the prompt after placeholder expansion
    image_span: tuple[int, int] | None  # [start, end) of the image tokens in the sequence (of the first image)
    prefill_logits: np.ndarray  # [V] at the last prompt position
    stop: str  # "eos" | "max_new_tokens"
    kept_positions: np.ndarray | None = None  # FastV, ATP-LLaVA, DyVTE, MustDrop: prompt positions after the last cut
    cut_positions: list[np.ndarray] | None = None  # FastV, ATP-LLaVA, DyVTE, MustDrop: the positions each cut keeps
    kept_features: np.ndarray | None = None  # GlobalCom²: indices into the vision graph's [P * n] tokens, in order
    merged_windows: np.ndarray | None = None  # MustDrop: the vision windows merged, by descending similarity
    key_set: np.ndarray | None = None  # MustDrop: the image tokens never dropped (indices into the image)
    cache_positions: np.ndarray | None = None  # SnapKV / A2SF / H2O: [layers, kv_heads, K] prompt positions cached
    retained_positions: np.ndarray | None = None  # H2O: [layers, kv_heads, n] positions cached at the end
    evicted_positions: np.ndarray | None = None  # H2O: [layers, kv_heads, steps] each step's evicted position (or -1)
    timings_ms: dict[str, float] = field(default_factory=dict)
    forced_logprobs: list[float] | None = None  # with ``forced``: log-probability of each forced token
    image_runs: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each image's tokens


def expand_placeholders(
    ids: np.ndarray, image_token_id: int, features: int | Sequence[int] | None, wrap: tuple[int, int] | None = None
) -> np.ndarray:
    """Expand each image placeholder to its image's ``features`` copies (what the HF processor does; one count per
    image, in order), between the ``wrap`` ids when the family has them (InternVL's ``<img>`` ... ``</img>``); ids
    that already carry one placeholder per feature pass unchanged. Any other count is a :class:`PromptError`."""
    where = np.flatnonzero(ids == image_token_id)
    if features is None:
        if len(where):
            raise PromptError(f"the prompt has {len(where)} image placeholder(s) but no image was given")
        return ids
    counts = [int(features)] if isinstance(features, int | np.integer) else [int(f) for f in features]
    if len(where) == len(counts) and counts != [1] * len(counts):
        pieces, start = [], 0
        for at, count in zip(where, counts, strict=True):
            run = np.full(count, image_token_id, ids.dtype)
            run = run if wrap is None else np.concatenate([[wrap[0]], run, [wrap[1]]]).astype(ids.dtype)
            pieces += [ids[start:at], run]
            start = at + 1
        return np.concatenate([*pieces, ids[start:]])
    if len(where) != sum(counts):
        given = f"the image gives {counts[0]}" if len(counts) == 1 else f"the {len(counts)} images give {counts}"
        raise PromptError(
            f"the prompt has {len(where)} image placeholders but {given} feature tokens; "
            "use exactly one image placeholder per image (it is expanded) or one per feature"
        )
    return ids


def without_image(template: str, placeholder: str = IMAGE_TOKEN) -> str:
    """``template`` with its image placeholder (and the newline after it) left out: the text-only prompt."""
    return template.replace(placeholder + "\n", "").replace(placeholder, "")


def image_template(template: str, placeholder: str, images: int) -> str:
    """``template`` for a prompt of ``images`` images: without the placeholder for none, the placeholder ``images``
    times, one after the other, for several."""
    if not images:
        return without_image(template, placeholder)
    return template.replace(placeholder, placeholder * images)


def listed_images(images: Any) -> list:
    """One image or a list / tuple of them as a list (``None``: none)."""
    if images is None:
        return []
    return list(images) if isinstance(images, list | tuple) else [images]


def image_runs(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of image tokens in ``ids`` (one per image), in order."""
    image = np.concatenate([[False], ids == image_token_id, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(image))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2], strict=True)]


def image_span(ids: np.ndarray, image_token_id: int) -> tuple[int, int] | None:
    """``[start, end)`` of the one image's tokens (``None``: no image); several runs are a :class:`PromptError`."""
    runs = image_runs(ids, image_token_id)
    if len(runs) > 1:
        raise PromptError("the image placeholders are not contiguous; one image is one run of placeholders")
    return runs[0] if runs else None


class LlavaRunner:
    """Run an MLLM artifact: ``LlavaRunner.from_artifact(tokensieve.load(DIR)).generate(image, prompt)``."""

    def __init__(
        self,
        directory: str | Path,
        manifest: MllmManifest,
        cache: str = "fixed",
        providers: list[str] | None = None,
        threads: int | None = None,
        spin: bool = True,
    ):
        if cache not in CACHE_MODES:
            raise RuntimeBackendError(f"unknown cache mode {cache!r}; choose one of {CACHE_MODES}")
        self.directory = Path(directory)
        self.host: dict[str, Any] = manifest.host
        self.cache = cache
        graphs = manifest.graphs
        methods = methods_from_dicts(manifest.methods)
        decode_key = "decode" if cache == "fixed" else "decode_growing"
        self.method: DecoderMethod | None = methods[0] if methods else None  # an MLLM artifact has one at most
        if decode_key not in graphs:
            if self.method is not None and not self.method.growing_cache:
                raise RuntimeBackendError(
                    f"{self.method.name} evicts inside the fixed-capacity decode graph; use the fixed cache"
                )
            raise RuntimeBackendError(f"this artifact has no {decode_key} graph; re-export with the growing cache")

        weights = SharedWeights(self.directory / graphs["external_data"]) if "external_data" in graphs else None
        options = {"providers": providers, "threads": threads, "spin": spin, "weights": weights}  # one copy of them
        family = image_family(self.host)
        self.vision = [OrtRunner(self.directory / graphs[k], **options) for k in VISION if k in graphs]
        self.images = None if family.graphs is None else family.graphs(self.directory, graphs, self.host, **options)
        self.positions = family.positions
        self.embed, self.decode = (OrtRunner(self.directory / graphs[k], **options) for k in ("embed", decode_key))
        self.prefill = Prefill(self.directory, manifest, **options)
        self.capacity: int | None = manifest.decoder["capacity"] if cache == "fixed" else None
        self.eviction = next((m for m in methods if m.ring), None)  # the fixed cache is a ring (StreamingLLM)
        self.budget: int = manifest.decoder["capacity"]  # positions an evicting cache keeps
        self.vocab: int = manifest.decoder["vocab"]
        newline = self.directory / "image_newline.npy"
        if family.newline and not newline.is_file():
            raise ArtifactError(f"artifact {self.directory} is incomplete: {newline.name} is missing; re-export it")
        self.newline = np.load(newline) if newline.is_file() else None
        from tokenizers import Tokenizer

        tokenizer = self.directory / manifest.tokenizer
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer))
        except Exception as e:  # tokenizers raises a bare Exception for a missing or malformed file
            raise ArtifactError(f"artifact {self.directory}: the tokenizer {tokenizer} cannot be read ({e})") from None
        self.placeholder: str = self.host.get("placeholder", IMAGE_TOKEN)
        wrap = [self.tokenizer.token_to_id(token) for token in self.host.get("image_wrap", [])]
        if None in wrap:
            raise ArtifactError(
                f"artifact {self.directory}: the tokenizer lacks the image tokens {self.host['image_wrap']}"
            )
        self.wrap: tuple[int, int] | None = tuple(wrap) if wrap else None

    @classmethod
    def from_artifact(cls, artifact, **kwargs) -> LlavaRunner:
        return cls(artifact.path, artifact.manifest, **kwargs)

    # -- pieces ------------------------------------------------------------------------------------------------
    def image_features(self, image: Any) -> np.ndarray:
        """``[N, D]`` features of one image, in the order they replace the placeholders."""
        return self.image_tokens(image)[0]

    def image_tokens(self, image: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The image's features ``[N, D]`` and what the method chose there: GlobalCom²'s ``kept_features`` (see
        :func:`tokensieve.runtimes.globalcom2.select_features`), MustDrop's ``merged_windows`` and ``key_set``; a
        family with grid-dependent vision graphs (Qwen-VL) gives the image's ``grid`` instead."""
        if self.images is not None:
            features, grid = self.images.encode(image)
            return features, {"grid": grid}
        pixel_values, size = preprocess(image, self.host)
        tokens = FACES.lookup("image_tokens", self.method)
        return tokens(self.vision, pixel_values, size, self.host, self.newline, self.method)

    def prompt_ids(self, prompt: str, template: str | None = None, image: bool | int = True) -> np.ndarray:
        """Token ids of ``prompt`` put into the chat template (unless it already holds the image placeholder,
        ``<image>`` for LLaVA); without an ``image`` the template's placeholder line is left out (``USER: {prompt}
        ASSISTANT:``); ``image = n`` images: the placeholder ``n`` times, one after the other."""
        if self.placeholder not in prompt:
            template = template or self.host["template"]
            if "{prompt}" not in template:
                raise PromptError(f"the chat template {template!r} has no {{prompt}} for the prompt to go into")
            prompt = image_template(template, self.placeholder, int(image)).replace("{prompt}", prompt)
        return np.asarray(self.tokenizer.encode(prompt).ids, np.int64)

    def _ids(self, input_ids: Any) -> np.ndarray:
        """``input_ids`` as given by a caller: a non-empty sequence of integer token ids inside the vocabulary."""
        ids = np.asarray(input_ids)
        if ids.size and ids.dtype.kind in "iu":
            ids = ids.astype(np.int64).ravel()
            if ((ids >= 0) & ((ids < self.vocab) | (ids == self.host["image_token_id"]))).all():
                return ids
        raise PromptError(f"input_ids must be a non-empty sequence of integer token ids in 0..{self.vocab - 1}")

    def inputs_embeds(self, ids: np.ndarray, features: np.ndarray | Sequence[np.ndarray] | None) -> np.ndarray:
        """The token embeddings of ``ids`` with each image's ``features`` (one array, or one per image in order) at
        its run of image tokens."""
        embeds = self.embed.run({"input_ids": ids[None]})["inputs_embeds"]
        if features is not None:  # in order over the image tokens, as the models scatter them
            embeds[0, ids == self.host["image_token_id"]] = np.concatenate(listed_images(features))
        return embeds

    def check_capacity(self, prompt_length: int, max_new_tokens: int) -> None:
        if self.capacity is None or (self.method is not None and self.method.evicts):
            return  # growing, or a cache that evicts: no limit
        cached = prompt_length if self.method is None else self.method.cached_prompt(prompt_length)
        needed = cached + max_new_tokens - 1  # the last new token is never written to the cache
        if needed > self.capacity:
            kept = "" if cached == prompt_length else f" ({cached} cached after {self.method.name})"
            raise CapacityError(
                f"the prompt is {prompt_length} tokens{kept} (image features included) and {max_new_tokens} new "
                f"tokens need {needed} cache slots, but the decode graph holds {self.capacity}; shorten the prompt, "
                "lower max_new_tokens, or re-export with a larger --capacity"
            )

    def _prompt(
        self, encoded: list[tuple[np.ndarray, dict]], prompt: str, input_ids: Any, template: str | None
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The prompt's ids with each image's placeholder expanded, and the runs of image tokens. Several images
        are refused for a method that reads one image run (``several_images`` false)."""
        method = self.method
        if len(encoded) > 1 and method is not None and not method.several_images:
            raise PromptError(f"{method.name} takes one image per prompt; give one image, or export without it")
        ids = self.prompt_ids(prompt, template, image=len(encoded)) if input_ids is None else self._ids(input_ids)
        counts = [len(features) for features, _ in encoded] or None
        ids = expand_placeholders(ids, self.host["image_token_id"], counts, self.wrap)
        return ids, image_runs(ids, self.host["image_token_id"])

    # -- generation --------------------------------------------------------------------------------------------
    def generate(
        self,
        image: Any = None,
        prompt: str = "",
        max_new_tokens: int = 32,
        *,
        input_ids: np.ndarray | None = None,
        stop_ids: list[int] | None = None,
        ignore_eos: bool = False,
        template: str | None = None,
        forced: list[int] | None = None,
    ) -> Generation:
        """Greedy generation; stops at ``stop_ids`` (default: the model's EOS) unless ``ignore_eos``. ``forced``
        (teacher forcing): these tokens are taken instead of the greedy ones, and their log-probabilities recorded."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 0:
            raise PromptError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if input_ids is None and not isinstance(prompt, str):
            raise PromptError(f"the prompt must be a str, got {type(prompt).__name__}")
        start = time.perf_counter()
        images = listed_images(image)
        encoded = [self.image_tokens(one) for one in images]
        t_vision = time.perf_counter()
        ids, runs = self._prompt(encoded, prompt, input_ids, template)
        self.check_capacity(len(ids), max_new_tokens)
        span = runs[0] if len(runs) == 1 else None  # one image: what the single-image methods read
        grids = [chosen["grid"] for _, chosen in encoded if "grid" in chosen]
        positions, rope_delta = self.positions(ids, self.host, grids)
        chosen = encoded[0][1] if len(encoded) == 1 else {}
        embeds = self.inputs_embeds(ids, [features for features, _ in encoded] or None)
        image_positions = np.concatenate([np.arange(*run) for run in runs]) if runs else None
        logits, present, extras = self.prefill(embeds, span, chosen.get("key_set"), positions, image_positions)
        t_prefill = time.perf_counter()
        stops = set() if ignore_eos else set(stop_ids if stop_ids is not None else [self.host["eos_id"]])
        kept = extras.get("kept_positions")
        dropped = [len(ids) - len(positions) for positions in extras.get("group_positions", [])]
        offset = len(ids) - present[0].shape[2]
        setup = DecodeSetup(self.capacity, dropped, offset, self.budget, self.eviction, extras, max_new_tokens)
        decoder = FACES.lookup("decoder", self.method)(self.decode, present, self.method, setup)
        decoder.rope_delta = rope_delta  # mRoPE: decoding rotates at the sequence index + this
        new: list[int] = []
        logprobs: list[float] = []
        next_logits, stop = logits, "max_new_tokens"
        for position in range(len(ids), len(ids) + max_new_tokens):
            token = int(np.argmax(next_logits)) if forced is None else int(forced[len(new)])
            if forced is not None:
                shifted = next_logits.ravel().astype(np.float64) - next_logits.max()
                logprobs.append(float(shifted[token] - np.log(np.exp(shifted).sum())))
            new.append(token)
            if token in stops:
                stop = "eos"
                break
            if len(new) < max_new_tokens:
                next_logits = decoder.step(token, position)
        end = time.perf_counter()
        steps = len(new) - 1  # no decode step after the last token
        return Generation(
            ids=new,
            text=self.tokenizer.decode(new, skip_special_tokens=True),
            prompt_ids=ids,
            image_span=runs[0] if runs else None,
            image_runs=runs,
            prefill_logits=logits,
            stop=stop,
            kept_positions=kept,
            cut_positions=extras.get("cut_positions"),
            kept_features=chosen.get("kept_features"),
            merged_windows=chosen.get("merged_windows"),
            key_set=chosen.get("key_set"),
            cache_positions=extras.get("cache_positions"),
            retained_positions=decoder.retained(),
            evicted_positions=decoder.evictions(),
            forced_logprobs=logprobs if forced is not None else None,
            timings_ms={
                "vision": 1e3 * (t_vision - start),
                "prefill": 1e3 * (t_prefill - t_vision),
                "decode_per_token": 1e3 * (end - t_prefill) / steps if steps > 0 else None,
            },
        )


@register("image_tokens", DecoderMethod, type(None))
def packed_features(
    vision: list[OrtRunner],
    pixel_values: np.ndarray,
    size: tuple[int, int],
    host: dict[str, Any],
    newline: np.ndarray | None,
    method: DecoderMethod | None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The image tokens of every method that leaves the vision side alone: the vision graph, then the plain packing
    (LLaVA-NeXT: AnyRes crops and newlines)."""
    out = vision[0].run({"pixel_values": pixel_values})
    return pack_features(out["image_features"], size, host, newline), {}
