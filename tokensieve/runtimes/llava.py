"""Generation with an MLLM artifact's four graphs on ONNX Runtime: vision, embed, prefill, decode.

The host does what the Hugging Face processor and ``generate`` do around the graphs: preprocess the image
(``llava_image.preprocess``), pack LLaVA-NeXT's crop features, tokenize the prompt, expand the ``<image>``
placeholder to the number of image features, write the features into the token embeddings at the placeholder
positions (found from ``input_ids``), run prefill, then greedy decoding until a stop token or ``max_new_tokens``.

Two cache forms: ``fixed`` (the default; static-shape ``decode`` graph with caches ``[1, H_kv, C, d]`` updated in
place at ``cache_position``, prefill's keys/values copied into slots ``0..T-1``: :class:`FixedCacheDecoder`) and
``growing`` (``decode_growing``:
past keys/values grow by one position per step). A prompt plus generation longer than the capacity raises
:class:`CapacityError` before anything runs. With SnapKV / A2SF the prefill graph returns the compressed prompt cache
(``budget`` positions per layer and KV head) and new tokens are cached after it, at their absolute positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.errors import CapacityError, PromptError, RuntimeBackendError
from tokensieve.methods import methods_from_dicts
from tokensieve.methods.prompt_cache import PromptCacheCompression
from tokensieve.methods.streamingllm import StreamingLLM
from tokensieve.runtimes.llava_image import pack_features, preprocess
from tokensieve.runtimes.ort import OrtRunner

IMAGE_TOKEN = "<image>"
CACHE_MODES = ("fixed", "growing")


@dataclass
class Generation:
    """The result of one :meth:`LlavaRunner.generate` call."""

    ids: list[int]  # new tokens, stop token included
    text: str
    prompt_ids: np.ndarray  # [T]: the prompt after placeholder expansion
    image_span: tuple[int, int] | None  # [start, end) of the image tokens in the sequence
    prefill_logits: np.ndarray  # [V] at the last prompt position
    stop: str  # "eos" | "max_new_tokens"
    kept_positions: np.ndarray | None = None  # FastV: prompt positions the layers from k on keep
    cache_positions: np.ndarray | None = None  # SnapKV / A2SF: [layers, kv_heads, K] prompt positions cached
    timings_ms: dict[str, float] = field(default_factory=dict)


def expand_placeholders(ids: np.ndarray, image_token_id: int, features: int | None) -> np.ndarray:
    """Expand a single image placeholder to ``features`` copies (what the HF processor does); ids that already carry
    one placeholder per feature pass unchanged. Any other count is a :class:`PromptError`."""
    where = np.flatnonzero(ids == image_token_id)
    if features is None:
        if len(where):
            raise PromptError(f"the prompt has {len(where)} image placeholder(s) but no image was given")
        return ids
    if len(where) == 1 and features != 1:
        return np.concatenate([ids[: where[0]], np.full(features, image_token_id, ids.dtype), ids[where[0] + 1 :]])
    if len(where) != features:
        raise PromptError(
            f"the prompt has {len(where)} image placeholders but the image gives {features} feature tokens; "
            f"use exactly one {IMAGE_TOKEN} per image (it is expanded) or one per feature"
        )
    return ids


def image_span(ids: np.ndarray, image_token_id: int) -> tuple[int, int] | None:
    where = np.flatnonzero(ids == image_token_id)
    if not len(where):
        return None
    if where[-1] - where[0] + 1 != len(where):
        raise PromptError("the image placeholders are not contiguous; one image is one run of placeholders")
    return int(where[0]), int(where[-1]) + 1


class LlavaRunner:
    """Run an MLLM artifact: ``LlavaRunner.from_artifact(tokensieve.load(DIR)).generate(image, prompt)``."""

    def __init__(
        self,
        directory: str | Path,
        manifest: dict[str, Any],
        cache: str = "fixed",
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        if cache not in CACHE_MODES:
            raise RuntimeBackendError(f"unknown cache mode {cache!r}; choose one of {CACHE_MODES}")
        self.directory = Path(directory)
        self.host: dict[str, Any] = manifest["host"]
        self.cache = cache
        graphs = manifest["graphs"]
        decode_key = "decode" if cache == "fixed" else "decode_growing"
        if decode_key not in graphs:
            raise RuntimeBackendError(f"this artifact has no {decode_key} graph; re-export with the growing cache")

        def runner(key: str) -> OrtRunner:
            return OrtRunner(self.directory / graphs[key], providers=providers, threads=threads)

        self.vision, self.embed, self.prefill_graph, self.decode = (
            runner(k) for k in ("vision", "embed", "prefill", decode_key)
        )
        self.layers = manifest["decoder"]["layers"]
        self.capacity: int | None = manifest["decoder"]["capacity"] if cache == "fixed" else None
        methods = methods_from_dicts(manifest.get("methods"))
        self.eviction = next((m for m in methods if isinstance(m, StreamingLLM)), None)
        self.compression = next((m for m in methods if isinstance(m, PromptCacheCompression)), None)
        self.budget: int = manifest["decoder"]["capacity"]  # positions an evicting cache keeps
        newline = self.directory / "image_newline.npy"
        self.newline = np.load(newline) if newline.is_file() else None
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.directory / manifest["tokenizer"]))

    @classmethod
    def from_artifact(cls, artifact, **kwargs) -> LlavaRunner:
        return cls(artifact.path, artifact.manifest, **kwargs)

    # -- pieces ------------------------------------------------------------------------------------------------
    def image_features(self, image: Any) -> np.ndarray:
        """``[N, D]`` features of one image, in the order they replace the placeholders."""
        pixel_values, size = preprocess(image, self.host)
        features = self.vision.run({"pixel_values": pixel_values})["image_features"]
        return pack_features(features, size, self.host, self.newline)

    def prompt_ids(self, prompt: str, template: str | None = None) -> np.ndarray:
        """Token ids of ``prompt`` put into the chat template (unless it already holds ``<image>``)."""
        if IMAGE_TOKEN not in prompt:
            prompt = (template or self.host["template"]).format(prompt=prompt)
        return np.asarray(self.tokenizer.encode(prompt).ids, np.int64)

    def inputs_embeds(self, ids: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        embeds = self.embed.run({"input_ids": ids[None]})["inputs_embeds"]
        span = image_span(ids, self.host["image_token_id"])
        if features is not None and span is not None:
            embeds[0, span[0] : span[1]] = features
        return embeds

    def prefill(
        self, embeds: np.ndarray, span: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
        """Last-position logits ``[V]``, the keys/values ``[key_0, value_0, key_1, ...]`` of the prompt (SnapKV /
        A2SF: compressed), and the method's outputs: ``kept_positions`` (FastV) or ``cache_positions``; ``span`` =
        the image tokens' ``[start, end)``."""
        out = self.prefill_graph.run(prefill_feeds(self.prefill_graph, embeds, span))
        present = [out[f"present_{n}"] for n in kv_names(self.layers)]
        extras = {name: out[name] for name in ("kept_positions", "cache_positions") if name in out}
        return out["logits"][0], present, extras

    def check_capacity(self, prompt_length: int, max_new_tokens: int) -> None:
        if self.capacity is None or self.eviction is not None:  # growing, or a ring that evicts: no limit
            return
        cached = prompt_length if self.compression is None else self.compression.kept_count(prompt_length)
        needed = cached + max_new_tokens - 1  # the last new token is never written to the cache
        if needed > self.capacity:
            kept = "" if cached == prompt_length else f" ({cached} cached after {self.compression.name})"
            raise CapacityError(
                f"the prompt is {prompt_length} tokens{kept} (image features included) and {max_new_tokens} new "
                f"tokens need {needed} cache slots, but the decode graph holds {self.capacity}; shorten the prompt, "
                "lower max_new_tokens, or re-export with a larger --capacity"
            )

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
    ) -> Generation:
        """Greedy generation; stops at ``stop_ids`` (default: the model's EOS) unless ``ignore_eos``."""
        start = time.perf_counter()
        features = self.image_features(image) if image is not None else None
        t_vision = time.perf_counter()
        ids = self.prompt_ids(prompt, template) if input_ids is None else np.asarray(input_ids, np.int64).ravel()
        ids = expand_placeholders(ids, self.host["image_token_id"], None if features is None else len(features))
        self.check_capacity(len(ids), max_new_tokens)
        span = image_span(ids, self.host["image_token_id"])
        logits, present, extras = self.prefill(self.inputs_embeds(ids, features), span)
        t_prefill = time.perf_counter()
        stops = set() if ignore_eos else set(stop_ids if stop_ids is not None else [self.host["eos_id"]])
        kept = extras.get("kept_positions")
        dropped = 0 if kept is None else len(ids) - len(kept)
        decoder = (
            FixedCacheDecoder(
                self.decode, present, self.capacity, dropped, self.eviction, offset=len(ids) - present[0].shape[2]
            )
            if self.capacity is not None
            else GrowingCacheDecoder(self.decode, present, self.eviction, self.budget)
        )
        new: list[int] = []
        next_logits, stop = logits, "max_new_tokens"
        for position in range(len(ids), len(ids) + max_new_tokens):
            token = int(np.argmax(next_logits))
            new.append(token)
            if token in stops:
                stop = "eos"
                break
            if len(new) < max_new_tokens:
                next_logits = decoder.step(token, position)
        end = time.perf_counter()
        decoded = max(len(new) - 1, 1)
        return Generation(
            ids=new,
            text=self.tokenizer.decode(new, skip_special_tokens=True),
            prompt_ids=ids,
            image_span=span,
            prefill_logits=logits,
            stop=stop,
            kept_positions=kept,
            cache_positions=extras.get("cache_positions"),
            timings_ms={
                "vision": 1e3 * (t_vision - start),
                "prefill": 1e3 * (t_prefill - t_vision),
                "decode_per_token": 1e3 * (end - t_prefill) / decoded,
            },
        )


def prefill_feeds(runner: OrtRunner, embeds: np.ndarray, span: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """Inputs of a prefill graph; FastV graphs also take ``image_positions`` (empty without an image)."""
    feeds = {"inputs_embeds": embeds, "position_ids": np.arange(embeds.shape[1], dtype=np.int64)[None]}
    if "image_positions" in runner.input_names:
        feeds["image_positions"] = np.arange(*(span or (0, 0)), dtype=np.int64)
    return feeds


def kv_names(layers: int) -> list[str]:
    return [f"{k}_{i}" for i in range(layers) for k in ("key", "value")]


class FixedCacheDecoder:
    """Steps the static decode graph with its caches updated **in place**: each cache buffer is bound both as the
    ``cache_*`` input and as the ``updated_*`` output (ONNX Runtime I/O binding), so ``ScatterND`` finds input and
    output in the same buffer and writes one slot instead of copying the whole cache, the way a TensorRT engine
    updates a KV cache that is network I/O. Prefill's keys/values go to slots ``0..T-1`` first (each layer its own
    ``T``). After FastV the later layers hold ``dropped`` fewer positions: they write slot ``position - dropped``
    (input ``pruned_cache_position``). With StreamingLLM (``eviction``) the cache is a ring: position ``p`` goes to
    ``eviction.slot(p)``, a prompt longer than the capacity keeps only its retained positions, and once the ring is
    full every slot is attended to (input ``visible_slots``). After SnapKV / A2SF every layer holds ``offset`` fewer
    positions than the prompt had: position ``p`` goes to slot ``p - offset``."""

    def __init__(
        self,
        runner: OrtRunner,
        present: list[np.ndarray],
        capacity: int,
        dropped: int = 0,
        eviction: StreamingLLM | None = None,
        offset: int = 0,
    ):
        import onnxruntime as ort

        self.runner, self.capacity, self.eviction, self.offset = runner, capacity, eviction, offset
        self.dropped = dropped if "pruned_cache_position" in runner.input_names else None
        self.caches = []
        for tensor in present:
            cache = np.zeros((*tensor.shape[:2], capacity, tensor.shape[3]), tensor.dtype)
            if eviction is None:
                cache[:, :, : tensor.shape[2]] = tensor
            else:
                kept = eviction.retained(tensor.shape[2], capacity)
                cache[:, :, [self.slot(p) for p in kept]] = tensor[:, :, kept]
            self.caches.append(ort.OrtValue.ortvalue_from_numpy(cache))
        self.binding = runner.session.io_binding()
        self.binding.bind_output("logits")
        for name, value in zip(kv_names(len(present) // 2), self.caches, strict=True):
            self.binding.bind_ortvalue_input(f"cache_{name}", value)
            self.binding.bind_ortvalue_output(f"updated_{name}", value)

    def slot(self, position: int) -> int:
        return position - self.offset if self.eviction is None else self.eviction.slot(position, self.capacity)

    def step(self, token: int, position: int) -> np.ndarray:
        """Logits ``[V]`` after feeding ``token`` at ``position`` (written to cache slot :meth:`slot`)."""
        self.binding.bind_cpu_input("input_ids", np.array([[token]], np.int64))
        self.binding.bind_cpu_input("position_ids", np.array([[position]], np.int64))
        self.binding.bind_cpu_input("cache_position", np.array([self.slot(position)], np.int64))
        if self.eviction is not None:
            visible = min(position + 1, self.capacity)
            self.binding.bind_cpu_input("visible_slots", np.array([visible], np.int64))
        if self.dropped is not None:
            self.binding.bind_cpu_input("pruned_cache_position", np.array([position - self.dropped], np.int64))
        self.runner.run_binding(self.binding)
        return self.binding.get_outputs()[0].numpy()[0]

    def cache(self, index: int) -> np.ndarray:
        """A copy of cache tensor ``index`` (order: key_0, value_0, key_1, ...)."""
        return self.caches[index].numpy()


class GrowingCacheDecoder:
    """Steps the growing-cache decode graph: past keys/values in, one-longer present keys/values out. With
    StreamingLLM (``eviction``), the past is cut on the host to ``budget`` positions after prefill and to
    ``budget - 1`` before each step (attention sinks first, then the most recent)."""

    def __init__(
        self, runner: OrtRunner, present: list[np.ndarray], eviction: StreamingLLM | None = None, budget: int = 0
    ):
        self.runner, self.eviction, self.budget = runner, eviction, budget
        self.past = [self._keep(t, budget) for t in present]
        names = kv_names(len(present) // 2)
        self.inputs, self.outputs = [f"past_{n}" for n in names], [f"present_{n}" for n in names]

    def step(self, token: int, position: int) -> np.ndarray:
        past = [self._keep(t, self.budget - 1) for t in self.past]
        feeds = {
            "input_ids": np.array([[token]], np.int64),
            "position_ids": np.array([[position]], np.int64),
            **dict(zip(self.inputs, past, strict=True)),
        }
        out = self.runner.run(feeds)
        self.past = [out[n] for n in self.outputs]
        return out["logits"][0]

    def _keep(self, tensor: np.ndarray, budget: int) -> np.ndarray:
        if self.eviction is None or tensor.shape[2] <= budget:
            return tensor
        return tensor[:, :, self.eviction.retained(tensor.shape[2], budget)]
