"""KV-cache decoders: step an MLLM artifact's decode graph one token at a time, feeding its cache and any eviction
state back (fixed-capacity cache with ONNX Runtime I/O binding, growing cache, H2O's heavy-hitter state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokensieve.graph_passes.heavy_hitters import RECENT
from tokensieve.graph_passes.split_cache_slot import slot_input
from tokensieve.graph_passes.split_positions import positions_input
from tokensieve.methods.decoder import DecoderMethod
from tokensieve.methods.faces import register
from tokensieve.methods.h2o import H2O
from tokensieve.methods.streamingllm import StreamingLLM
from tokensieve.runtimes.ort import OrtRunner

ROPE_DELTA = "rope_delta"  # mRoPE decode graphs: added to the sequence index where the new token rotates


def kv_names(layers: int) -> list[str]:
    return [f"{k}_{i}" for i in range(layers) for k in ("key", "value")]


def cache_inputs(runner: OrtRunner) -> dict[str, tuple[int, ...]]:
    """The fixed decode graph's cache tensors in its input order: name (input ``cache_<name>``, updated in place as
    output ``updated_<name>``) -> the static shape the graph declares (per layer ``key_<i>``, ``value_<i>``; a method
    may give some KV heads tensors of their own, with their own capacity)."""
    outputs = set(runner.output_names)
    return {
        value.name[6:]: tuple(value.shape)
        for value in runner.session.get_inputs()
        if value.name.startswith("cache_") and f"updated_{value.name[6:]}" in outputs
    }


def position_feeds(
    runner: OrtRunner, position: int, dropped: Sequence[int], rope_delta: int = 0
) -> dict[str, np.ndarray]:
    """``position_ids``, ``rope_delta`` where the graph takes it (mRoPE: the new token rotates at ``position +
    rope_delta``) and, in MustDrop's and SparseVLM's decode graphs, ``pruned_position_ids`` (``_1``, ...: the layers
    after group ``g``'s cut rotate at their own cache length, ``position - dropped[g]``)."""
    feeds = {"position_ids": np.array([[position]], np.int64)}
    if ROPE_DELTA in runner.input_names:
        feeds[ROPE_DELTA] = np.array([rope_delta], np.int64)
    for g, drop in enumerate(dropped):
        if positions_input(g) in runner.input_names:
            feeds[positions_input(g)] = np.array([[position - drop]], np.int64)
    return feeds


class FixedCacheDecoder:
    """Steps the static decode graph with its caches updated **in place**: each cache buffer is bound both as the
    ``cache_*`` input and as the ``updated_*`` output (ONNX Runtime I/O binding), so ``ScatterND`` finds input and
    output in the same buffer and writes one slot instead of copying the whole cache, the way a TensorRT engine
    updates a KV cache that is network I/O. Each buffer has the shape the graph declares for it
    (:func:`cache_inputs`; ``present`` holds one tensor per cache input, in that order). Prefill's keys/values go to
    slots ``0..T-1`` first (each layer its own ``T``). After FastV / ATP-LLaVA / DyVTE / MustDrop the layers after
    cut ``g`` hold ``dropped[g]`` fewer positions: they write slot ``position - dropped[g]`` (inputs
    ``pruned_cache_position``, ``pruned_cache_position_1``, ...). With StreamingLLM (``eviction``) the cache is a
    ring: position ``p`` goes to ``eviction.slot(p)``, a prompt longer than the capacity keeps only its retained
    positions, and once the ring is full every slot is attended to (input ``visible_slots``). After SnapKV / A2SF
    every layer holds ``offset`` fewer positions than the prompt had: position ``p`` goes to slot ``p - offset``.
    After MustDrop the layers from the first filter layer on also rotate the new token at ``position - dropped[0]``
    (:func:`position_feeds`). ``rope_delta`` (mRoPE) is what generation sets after prefill."""

    rope_delta: int = 0

    def __init__(
        self,
        runner: OrtRunner,
        present: list[np.ndarray],
        capacity: int,
        dropped: Sequence[int] = (),
        eviction: StreamingLLM | None = None,
        offset: int = 0,
    ):
        import onnxruntime as ort

        self.runner, self.capacity, self.eviction, self.offset = runner, capacity, eviction, offset
        self.groups = list(dropped)
        self.dropped = {slot_input(g): d for g, d in enumerate(dropped) if slot_input(g) in runner.input_names}
        self.caches = []
        names = cache_inputs(runner)
        for shape, tensor in zip(names.values(), present, strict=True):
            cache = np.zeros(shape, tensor.dtype)
            if eviction is None:
                cache[:, :, : tensor.shape[2]] = tensor
            else:
                kept = eviction.retained(tensor.shape[2], capacity)
                cache[:, :, [self.slot(p) for p in kept]] = tensor[:, :, kept]
            self.caches.append(ort.OrtValue.ortvalue_from_numpy(cache))
        self.binding = runner.session.io_binding()
        self.binding.bind_output("logits")
        for name, value in zip(names, self.caches, strict=True):
            self.binding.bind_ortvalue_input(f"cache_{name}", value)
            self.binding.bind_ortvalue_output(f"updated_{name}", value)

    def slot(self, position: int) -> int:
        return position - self.offset if self.eviction is None else self.eviction.slot(position, self.capacity)

    def step(self, token: int, position: int) -> np.ndarray:
        """Logits ``[V]`` after feeding ``token`` at ``position`` (written where :meth:`bind_slots` says)."""
        self.binding.bind_cpu_input("input_ids", np.array([[token]], np.int64))
        for name, value in position_feeds(self.runner, position, self.groups, self.rope_delta).items():
            self.binding.bind_cpu_input(name, value)
        self.bind_slots(position)
        self.runner.run_binding(self.binding)
        return self.binding.get_outputs()[0].numpy()[0]

    def bind_slots(self, position: int) -> None:
        """Bind the inputs that say where ``position`` is written and which slots are attended to."""
        self.binding.bind_cpu_input("cache_position", np.array([self.slot(position)], np.int64))
        if self.eviction is not None:
            visible = min(position + 1, self.capacity)
            self.binding.bind_cpu_input("visible_slots", np.array([visible], np.int64))
        for name, dropped in self.dropped.items():
            self.binding.bind_cpu_input(name, np.array([position - dropped], np.int64))

    def retained(self) -> np.ndarray | None:
        """The positions cached at the end, when the decoder chooses them itself (H2O); ``None`` otherwise."""
        return None

    def evictions(self) -> np.ndarray | None:
        """The position each step evicted, when the decoder chooses it itself (H2O); ``None`` otherwise."""
        return None

    def cache(self, index: int) -> np.ndarray:
        """A copy of cache tensor ``index`` (order: key_0, value_0, key_1, ...)."""
        return self.caches[index].numpy()


class HeavyHitterDecoder(FixedCacheDecoder):
    """Steps an H2O decode graph, which accumulates attention and chooses the slot to evict per layer and KV head;
    this class feeds that state back. Prefill's compressed cache (``K <= budget`` positions per layer and KV head,
    with their ``scores``) fills slots ``0..K-1``; new tokens take the next free slot until ``budget + 1`` positions
    are held (``budget, recent = method.window(length)`` for the ``length``-position prompt; ``recent`` is fed as
    ``recent_window`` where the graph takes it), then the slot each layer and head evicted on the previous step.
    The scores live in two ONNX Runtime buffers that swap roles every step (input ``h2o_scores`` / output
    ``updated_h2o_scores``)."""

    def __init__(
        self,
        runner: OrtRunner,
        present: list[np.ndarray],
        capacity: int,
        method: H2O,
        positions: np.ndarray,
        scores: np.ndarray,
        length: int,
    ):
        import onnxruntime as ort

        super().__init__(runner, present, capacity)
        self.method = method
        budget, self.recent = method.window(length)  # length: the prompt's positions
        self.slots = budget + 1
        layers, kv, kept = positions.shape
        self.held = np.full((layers, kv, capacity), -1, np.int64)  # the position each slot holds
        self.held[:, :, :kept] = positions
        state = np.zeros((layers, kv, capacity), scores.dtype)
        state[:, :, :kept] = scores
        self.scores = [ort.OrtValue.ortvalue_from_numpy(state), ort.OrtValue.ortvalue_from_numpy(np.zeros_like(state))]
        self.used = kept
        self.write = np.zeros((layers, kv), np.int64)
        self.evict: np.ndarray | None = None
        self.evicted = ort.OrtValue.ortvalue_from_numpy(np.zeros((layers, kv), np.int64))
        self.binding.bind_ortvalue_output("evict_slots", self.evicted)
        self.evicted_steps: list[np.ndarray | None] = []

    def bind_slots(self, position: int) -> None:
        if self.used < self.slots:
            self.write = np.full(self.held.shape[:2], self.used, np.int64)
            self.used += 1
        else:
            self.write = self.evict
        self.binding.bind_cpu_input("visible_slots", np.array([self.used], np.int64))
        self.binding.bind_cpu_input("write_slots", self.write)
        self.binding.bind_cpu_input("slot_positions", self.held)
        self.binding.bind_ortvalue_input("h2o_scores", self.scores[0])
        self.binding.bind_ortvalue_output("updated_h2o_scores", self.scores[1])
        if RECENT in self.runner.input_names:  # the recent count follows the prompt (prompt_share)
            self.binding.bind_cpu_input(RECENT, np.array([self.recent], np.int64))

    def step(self, token: int, position: int) -> np.ndarray:
        logits = super().step(token, position)
        self.evict = self.evicted.numpy().copy()  # numpy() shares the buffer the next step overwrites
        self.scores.reverse()
        np.put_along_axis(self.held, self.write[..., None], position, axis=2)
        full = self.used == self.slots  # the evicted slot's position leaves the cache
        self.evicted_steps.append(np.take_along_axis(self.held, self.evict[..., None], 2)[..., 0] if full else None)
        return logits

    def evictions(self) -> np.ndarray:
        """``[layers, H_kv, steps]``: the position each step evicted per layer and KV head (-1: the cache was not
        full yet)."""
        shape = self.held.shape[:2]
        steps = [np.full(shape, -1, np.int64) if e is None else e for e in self.evicted_steps]
        return np.stack(steps, -1) if steps else np.zeros((*shape, 0), np.int64)

    def retained(self) -> np.ndarray:
        """``[layers, H_kv, n]``: the positions cached after the last step's eviction, ascending."""
        held = self.held[:, :, : self.used]
        if self.used == self.slots and self.evict is not None:  # full: the last step evicted a slot
            live = np.ones(held.shape, bool)
            np.put_along_axis(live, self.evict[..., None], False, axis=2)
            held = held[live].reshape(*held.shape[:2], -1)
        return np.sort(held, axis=-1)


class GrowingCacheDecoder:
    """Steps the growing-cache decode graph: past keys/values in, one-longer present keys/values out. With
    StreamingLLM (``eviction``), the past is cut on the host to ``budget`` positions after prefill and to
    ``budget - 1`` before each step (attention sinks first, then the most recent). ``dropped``: as in
    :class:`FixedCacheDecoder` (the past lengths say the rest); ``rope_delta``: as there."""

    rope_delta: int = 0

    def __init__(
        self,
        runner: OrtRunner,
        present: list[np.ndarray],
        eviction: StreamingLLM | None = None,
        budget: int = 0,
        dropped: Sequence[int] = (),
    ):
        self.runner, self.eviction, self.budget, self.dropped = runner, eviction, budget, list(dropped)
        self.past = [self._keep(t, budget) for t in present]
        names = kv_names(len(present) // 2)
        self.inputs, self.outputs = [f"past_{n}" for n in names], [f"present_{n}" for n in names]

    def step(self, token: int, position: int) -> np.ndarray:
        past = [self._keep(t, self.budget - 1) for t in self.past]
        feeds = {
            "input_ids": np.array([[token]], np.int64),
            **position_feeds(self.runner, position, self.dropped, self.rope_delta),
            **dict(zip(self.inputs, past, strict=True)),
        }
        out = self.runner.run(feeds)
        self.past = [out[n] for n in self.outputs]
        return out["logits"][0]

    def retained(self) -> None:
        return None

    def evictions(self) -> None:
        return None

    def _keep(self, tensor: np.ndarray, budget: int) -> np.ndarray:
        if self.eviction is None or tensor.shape[2] <= budget:
            return tensor
        return tensor[:, :, self.eviction.retained(tensor.shape[2], budget)]


@dataclass
class DecodeSetup:
    """What generation hands a method's ``"decoder"`` face after prefill."""

    capacity: int | None  # the fixed cache's slots; None: the growing cache
    dropped: list[int]  # per cache group (a cut's later layers), the prompt positions its layers do not hold
    offset: int  # prompt positions no layer holds (SnapKV / A2SF: compressed away)
    budget: int  # positions an evicting growing cache keeps
    eviction: Any = None  # the ring method (``ring``: StreamingLLM), or None
    extras: dict[str, Any] = field(default_factory=dict)  # prefill's method outputs (cache_positions, ...)
    new_tokens: int = 0  # the generation's max_new_tokens (schedules over the generation: Keyformer's temperature)


@register("decoder", DecoderMethod, type(None))
def slot_groups(runner: OrtRunner, present: list[np.ndarray], method: Any, setup: DecodeSetup):
    """The decoder of every method without decode-time state: fixed (slot groups, ring) or growing cache."""
    if setup.capacity is not None:
        return FixedCacheDecoder(runner, present, setup.capacity, setup.dropped, setup.eviction, setup.offset)
    return GrowingCacheDecoder(runner, present, setup.eviction, setup.budget, setup.dropped)


@register("decoder", H2O)
def heavy_hitters(runner: OrtRunner, present: list[np.ndarray], method: H2O, setup: DecodeSetup) -> HeavyHitterDecoder:
    positions, scores = setup.extras["cache_positions"], setup.extras["cache_scores"]
    length = setup.offset + present[0].shape[2]
    return HeavyHitterDecoder(runner, present, setup.capacity, method, positions, scores, length)


@register("bench_decoder", DecoderMethod, type(None))
def bench_slot_groups(
    runner: OrtRunner, caches: list[np.ndarray], capacity: int, method: Any, rng: np.random.Generator
) -> FixedCacheDecoder:
    """Over random ``caches``: StreamingLLM's ring, FastV / ATP-LLaVA / DyVTE / MustDrop / p-MoD's per-group slot
    inputs, as many as the decode graph has (nothing dropped: the fixed graph costs the same whatever the groups
    hold)."""
    groups = [0] * sum(slot_input(g) in runner.input_names for g in range(len(runner.input_names)))
    return FixedCacheDecoder(runner, caches, capacity, groups, method if getattr(method, "ring", False) else None)


@register("bench_decoder", H2O)
def bench_heavy_hitters(
    runner: OrtRunner, caches: list[np.ndarray], capacity: int, method: H2O, rng: np.random.Generator
) -> HeavyHitterDecoder:
    """H2O's decoder with ``budget`` held positions and random scores."""
    present, positions, scores, length = bench_state(caches, method.budget, rng)
    return HeavyHitterDecoder(runner, present, capacity, method, positions, scores, length)


def bench_state(caches: list[np.ndarray], budget: int, rng: np.random.Generator) -> tuple:
    """A full heavy-hitter cache for ``tokensieve bench``: the first ``budget`` positions of random ``caches``, their
    positions and random scores, as the decoders' ``present``, ``positions``, ``scores`` and prompt ``length``."""
    layers, kv = len(caches) // 2, caches[0].shape[1]
    shape = (layers, kv, budget)
    positions = np.broadcast_to(np.arange(budget), shape).copy()
    return [c[:, :, :budget] for c in caches], positions, rng.random(shape, dtype=np.float32), budget
