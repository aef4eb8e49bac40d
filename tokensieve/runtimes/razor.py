"""RazorAttention on the host: the retrieval-head probe export runs on the exported graphs (``"settle"``) and the
decoders that feed the two cache lengths per layer (``"decoder"``, ``"bench_decoder"``).

The probe (docs/methods.md#razorattention): the declaration's repeated random sequence runs through the embed and
the unreduced prefill graph on ONNX Runtime with every layer's attention probabilities exposed; each query head's
echo and induction scores are averaged over the second copy, each KV head takes the mean of its query heads, and the
declaration picks the retrieval heads. The decode graph (``tokensieve.graph_passes.razor``) keeps each layer's head
classes in cache tensors of their own and writes the new token at ``cache_position`` in retrieval heads and at the
slot input ``pruned_cache_position`` = ``position + 1 - D`` in the others (``D``: the positions folded into the
compensation token); the decoder splits the prompt cache the same way.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from tokensieve.errors import CapacityError, PromptError
from tokensieve.graph_passes.locate_decoder import locate_decoder
from tokensieve.graph_passes.split_cache_slot import slot_input
from tokensieve.methods.faces import register
from tokensieve.methods.razor import RazorAttention
from tokensieve.runtimes.kv_cache import DecodeSetup, FixedCacheDecoder
from tokensieve.runtimes.ort import OrtRunner
from tokensieve.runtimes.prefill import prefill_feeds


def head_scores(probs: np.ndarray, probe: int, kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Echo and induction scores ``[kv_heads]`` from one layer's probabilities ``[H, 2n, 2n]`` on the probe."""
    queries = np.arange(probe, 2 * probe)
    echo = probs[:, queries, queries - probe].mean(-1)
    induction = probs[:, queries[:-1], queries[:-1] - probe + 1].mean(-1)
    return echo.reshape(kv_heads, -1).mean(1), induction.reshape(kv_heads, -1).mean(1)


@register("settle", RazorAttention)
def find_retrieval_heads(graphs: dict[str, ir.Model], method: RazorAttention) -> RazorAttention:
    """``method`` with its retrieval heads, found by running the probe through the exported (unreduced) graphs
    (heads given in the method string are kept)."""
    if method.heads is not None:
        return method
    layout = locate_decoder(graphs["prefill"])
    names = [layer.softmax.outputs[0].name for layer in layout.layers]
    vocab = next(v for v in graphs["prefill"].graph.outputs if v.name == "logits").shape[-1]
    with tempfile.TemporaryDirectory() as tmp:
        for key in ("embed", "prefill"):
            ir.save(graphs[key], Path(tmp) / f"{key}.onnx", external_data=f"{key}.data")
        embed, prefill = OrtRunner(Path(tmp) / "embed.onnx"), OrtRunner(Path(tmp) / "prefill.onnx", extra_outputs=names)
        ids = np.array([method.probe_ids(int(vocab))], np.int64)
        embeds = embed.run({"input_ids": ids})["inputs_embeds"]
        out = prefill.run(prefill_feeds(prefill, embeds, None), names)
    scores = [head_scores(out[name][0], method.probe, layout.kv_heads) for name in names]
    echo, induction = (np.concatenate(kind).tolist() for kind in zip(*scores, strict=True))
    chosen = method.choose(echo, induction)
    return dataclasses.replace(method, heads=tuple(divmod(index, layout.kv_heads) for index in chosen))


@register("decoder", RazorAttention)
def head_class_slots(
    runner: OrtRunner, present: list[np.ndarray], method: RazorAttention, setup: DecodeSetup
) -> FixedCacheDecoder:
    """The fixed-cache decoder over each layer's two cache tensors (the prompt cache split by head class) with the
    non-retrieval heads' write slot ``position + 1 - D``."""
    length = present[0].shape[2] - 1  # the layout has one entry more than the prompt
    if length <= method.sink:
        raise PromptError(
            f"razor: the prompt has {length} positions but non-retrieval heads keep sink={method.sink} attention "
            "sinks before their compensation token; give a longer prompt or export with a smaller sink"
        )
    held, size = length + 1 - method.dropped(length), method.local_capacity(setup.capacity)
    if held + setup.new_tokens - 1 > size:
        raise CapacityError(
            f"razor: the non-retrieval heads' cache holds {size} slots, but the prompt leaves {held} entries there "
            f"and {setup.new_tokens} new tokens need {held + setup.new_tokens - 1}; lower max_new_tokens or export "
            f"with razor(new_tokens=...) >= {setup.new_tokens}"
        )
    parts = [part for index, tensor in enumerate(present) for part in split_heads(tensor, method, index // 2, held)]
    return FixedCacheDecoder(runner, parts, setup.capacity, [method.dropped(length) - 1])


def split_heads(tensor: np.ndarray, method: RazorAttention, layer: int, held: int) -> list[np.ndarray]:
    """One layer's prompt keys or values ``[1, H_kv, T + 1, d]`` as the decode graph's cache tensors hold them: the
    retrieval heads (all entries), then the others (their first ``held``), leaving out a class without heads."""
    flags = np.array(method.retrieval(layer, tensor.shape[1]))
    parts = [tensor[:, flags], tensor[:, ~flags, :held]]
    return [part for part in parts if part.shape[1]]


class _BenchSlots(FixedCacheDecoder):
    """``tokensieve bench``'s decoder: the non-retrieval heads write at the position, up to their last slot."""

    def __init__(self, runner: OrtRunner, caches: list[np.ndarray], capacity: int, last: int):
        super().__init__(runner, caches, capacity, [0])
        self.last = last

    def bind_slots(self, position: int) -> None:
        super().bind_slots(position)
        self.binding.bind_cpu_input(slot_input(0), np.array([min(position, self.last)], np.int64))


@register("bench_decoder", RazorAttention)
def bench_head_class_slots(
    runner: OrtRunner, caches: list[np.ndarray], capacity: int, method: RazorAttention, rng: np.random.Generator
) -> FixedCacheDecoder:
    """Over random ``caches`` (the fixed graph costs the same whatever they hold)."""
    return _BenchSlots(runner, caches, capacity, method.local_capacity(capacity) - 1)
