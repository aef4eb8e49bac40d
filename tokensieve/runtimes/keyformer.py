"""Keyformer on the host: the Gumbel noise and temperature its graphs take as inputs, drawn and fed here.

The noise of step ``t`` (0: the prompt, ``t``: the ``t``-th decode step) is
``numpy.random.default_rng([seed, t]).gumbel(size=shape)`` in float32 (:func:`gumbel_noise`): prefill's
``gumbel_noise [layers, H, T, T]`` (per query row and key position), each decode step's ``gumbel_noise [layers, H, 1,
C]`` (per cache slot) with ``gumbel_tau [1]`` = ``tau_t`` (:meth:`tokensieve.methods.keyformer.Keyformer.tau`). The
eager reference draws the same arrays, so the selections compare exactly. Eviction itself is H2O's decoder
(:class:`tokensieve.runtimes.kv_cache.HeavyHitterDecoder`, which also records the position each step evicts);
:class:`GumbelDecoder` adds the two inputs.
"""

from __future__ import annotations

import numpy as np

from tokensieve.errors import CapacityError
from tokensieve.graph_passes.keyformer import NOISE, TAU
from tokensieve.methods.faces import register
from tokensieve.methods.keyformer import Keyformer
from tokensieve.runtimes.kv_cache import DecodeSetup, HeavyHitterDecoder, bench_state
from tokensieve.runtimes.ort import OrtRunner


def gumbel_noise(seed: int, step: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard Gumbel noise of step ``step`` (0: the prompt) of a generation seeded ``seed``, float32."""
    return np.random.default_rng([seed, step]).gumbel(size=shape).astype(np.float32)


def _input_dims(runner: OrtRunner, name: str) -> list:
    return next(i.shape for i in runner.session.get_inputs() if i.name == name)


@register("prefill_inputs", Keyformer)
def prompt_noise(runner: OrtRunner, embeds: np.ndarray, span: tuple[int, int] | None, method: Keyformer) -> dict:
    """Prefill's ``gumbel_noise [layers, H, T, T]`` for the ``T``-position prompt ``embeds``."""
    layers, heads = _input_dims(runner, NOISE)[:2]
    length = embeds.shape[1]
    return {NOISE: gumbel_noise(method.seed, 0, (layers, heads, length, length))}


class GumbelDecoder(HeavyHitterDecoder):
    """H2O's decoder feeding each step's Gumbel noise and temperature (step ``t`` of ``new_tokens``)."""

    def __init__(self, *args, new_tokens: int):
        super().__init__(*args)
        self.new_tokens, self.step_index = new_tokens, 0
        self.noise_shape = tuple(_input_dims(self.runner, NOISE))

    def bind_slots(self, position: int) -> None:
        super().bind_slots(position)
        self.step_index += 1
        tau = np.array([float(self.method.tau(self.step_index, self.new_tokens))], np.float32)
        self.binding.bind_cpu_input(NOISE, gumbel_noise(self.method.seed, self.step_index, self.noise_shape))
        self.binding.bind_cpu_input(TAU, tau)


@register("decoder", Keyformer)
def gumbel_decoder(runner: OrtRunner, present: list[np.ndarray], method: Keyformer, setup: DecodeSetup):
    positions, scores = setup.extras["cache_positions"], setup.extras["cache_scores"]
    length = setup.offset + present[0].shape[2]
    budget = method.window(length)[0]
    if budget + 1 > setup.capacity:
        raise CapacityError(
            f"keyformer keeps {budget} positions of the {length}-position prompt and needs {budget + 1} cache slots, "
            f"but the decode graph holds {setup.capacity}; shorten the prompt, lower kv_cache, or re-export with "
            f"--capacity {budget + 1} or more"
        )
    state = (runner, present, setup.capacity, method, positions, scores, length)
    return GumbelDecoder(*state, new_tokens=setup.new_tokens)


@register("bench_decoder", Keyformer)
def bench_gumbel(
    runner: OrtRunner, caches: list[np.ndarray], capacity: int, method: Keyformer, rng: np.random.Generator
) -> GumbelDecoder:
    """Keyformer's decoder on a full cache of random scores (explicit counts: ``budget`` positions; shares of the
    prompt: ``capacity - 1``, the most the graph holds)."""
    length = method.budget or _prompt_for(method, capacity - 1)
    present, positions, scores, _ = bench_state(caches, method.window(length)[0], rng)
    return GumbelDecoder(runner, present, capacity, method, positions, scores, length, new_tokens=capacity)


def _prompt_for(method: Keyformer, budget: int) -> int:
    """The longest prompt whose share-of-the-prompt budget is at most ``budget``."""
    length = budget
    while method.counts(length + 1)[0] <= budget:
        length += 1
    return length
