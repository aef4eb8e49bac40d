"""Keyformer's scoring steps in the H2O passes: the Gumbel-softmax of each layer's own attention logits.

Keyformer exports as H2O does (``tokensieve.graph_passes.heavy_hitters``: the prompt cache compressed in prefill by
:class:`~tokensieve.graph_passes.prompt_cache.PromptCachePass`, eviction in the fixed decode graph by
:class:`~tokensieve.graph_passes.heavy_hitters.HeavyHitterPass`); this module registers the two scores those passes
look up for :class:`~tokensieve.methods.keyformer.Keyformer`.

Matches: per decoder layer the attention ``Softmax``; its input is the layer's logits ``Q·Kᵀ/sqrt(d)`` plus the mask
(causal in prefill, the visible slots in decode).

Inserts, per layer (the layer's own attention is untouched):

* prefill (``"cache_score"``): input ``gumbel_noise [layers, H, T, T]`` (one input for every layer, ``Gather`` of
  the layer's slice), ``Softmax((logits + noise) / tau_init)`` (``tau_init`` a constant: the prompt is step 0),
  ``ReduceSum`` over the query rows and over each KV group's query heads -> ``[1, H_kv, T]``;
* decode (``"step_score"``): inputs ``gumbel_noise [layers, H, C]`` (per cache slot) and ``gumbel_tau [1]``, and
  ``Softmax((logits + noise) / tau) [1, H, 1, C]``, which the H2O pass sums per KV group and accumulates.

No random operator: the host draws the noise (:func:`tokensieve.runtimes.keyformer.gumbel_noise`), so the graphs
are deterministic and TensorRT-friendly.
"""

from __future__ import annotations

import onnx_ir as ir

from tokensieve.graph_passes.builder import NodeBuilder, typed
from tokensieve.graph_passes.heavy_hitters import HeavyHitterPass, graph_input
from tokensieve.graph_passes.locate_decoder import DecoderLayer
from tokensieve.graph_passes.prompt_cache import PromptCachePass
from tokensieve.methods.faces import register
from tokensieve.methods.keyformer import Keyformer

NOISE = "gumbel_noise"
TAU = "gumbel_tau"


def _gumbel_softmax(b: NodeBuilder, layer: DecoderLayer, noise: ir.Value, tau: ir.Value, dims: list) -> ir.Value:
    """``Softmax((logits + noise[layer]) / tau)`` over the keys, ``dims`` = the logits' ``[1, H, rows, keys]``."""
    real = layer.softmax.outputs[0].dtype
    own = typed(b.op("Gather", [noise, b.const([layer.index])], "layer_noise", axis=0), dims, real)
    noisy = typed(b.op("Add", [layer.softmax.inputs[0], own], "noisy_logits"), dims, real)
    tempered = typed(b.op("Div", [noisy, tau], "tempered"), dims, real)
    return typed(b.op("Softmax", [tempered], "gumbel_softmax", axis=-1), dims, real)


@register("cache_score", Keyformer)
def prompt_score(cache: PromptCachePass, b: NodeBuilder, layer: DecoderLayer, geo: dict, seq) -> ir.Value:
    """Keyformer's prefill score ``[1, H_kv, T]``: the Gumbel-softmax at ``tau_init`` summed over every prompt row
    and each KV group's query heads."""
    layout, real = cache.layout, layer.softmax.outputs[0].dtype
    heads, kv = layout.heads, layout.kv_heads
    noise = graph_input(cache.graph, NOISE, [len(layout.layers), heads, seq, seq], real)
    tau = b.const(float(cache.method.tau_init), "tau_init", dtype=real.numpy())
    scores = _gumbel_softmax(b, layer, noise, tau, [1, heads, seq, seq])
    summed = typed(b.reduce("ReduceSum", scores, [2], keepdims=False), [1, heads, seq], real)
    grouped = typed(b.op("Reshape", [summed, b.const([1, kv, heads // kv, -1])]), [1, kv, heads // kv, seq], real)
    return typed(b.reduce("ReduceSum", grouped, [2], keepdims=False), [1, kv, seq], real)


@register("step_score", Keyformer)
def step_score(heavy: HeavyHitterPass, b: NodeBuilder, layer: DecoderLayer, index: int) -> ir.Value:
    """Keyformer's decode-step score ``[1, H, 1, C]``: the Gumbel-softmax at the fed temperature."""
    layout, real = heavy.layout, layer.softmax.outputs[0].dtype
    capacity = int(layer.cache_inputs[0].shape[2])
    graph = layer.softmax.graph
    noise = graph_input(graph, NOISE, [len(layout.layers), layout.heads, 1, capacity], real)
    tau = graph_input(graph, TAU, [1], real)
    return _gumbel_softmax(b, layer, noise, tau, [1, layout.heads, 1, capacity])
