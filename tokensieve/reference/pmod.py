"""Eager p-MoD on a Hugging Face LLaVA / LLaVA-NeXT model: the ground truth the exported graphs are held to.

Written from the paper, the official ``ModLayer`` semantics and docs/methods.md#p-mod on the model's own modules,
independently of the graph pass:

1. one unreduced forward with ``output_attentions`` (eager attention) gives the merged input embeddings and, for
   the training-free choice, the probabilities of layer ``first - 1`` (p-MoD changes nothing before layer
   ``first``): rows after the image, image columns, mean over heads, summed over the rows;
2. prefill layer by layer: a plain layer runs every token; a MoD layer runs the text tokens and the top
   ``trunc(N * ratio)`` image tokens (the official float32 count; priority: the attention score, or the router
   weight ``0.2 * tanh(router(h)) + 1`` of the stream entering it; a stable descending sort, lower position first
   on ties) on their own causal mask at their original position ids, its keys/values going to a
   ``transformers.DynamicCache`` (each layer its own length); the result is written back into the full stream
   (with routers, the stream is first multiplied by ``w``, and the layer's MLP output by ``w`` through a forward
   hook on the MLP);
3. greedy decoding at absolute positions, every layer attending to all of its cached positions.
"""

from __future__ import annotations

import numpy as np
import torch

from tokensieve.graph_passes.pmod import load_routers, router_key
from tokensieve.methods.pmod import PMoD
from tokensieve.reference.decoding import CutResult, attention_forward, causal_mask, greedy, reference_face


def official_count(image_tokens: int, ratio: float) -> int:
    """The official count: an int32 count times the float ratio, in float32 (torch's promotion), truncated."""
    return int(torch.trunc(torch.tensor([image_tokens], dtype=torch.int32) * ratio)[0])


def attention_score(attention: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``[I]``: the head-mean probabilities ``[1, H, T, T]`` of the rows after the image on the image columns,
    summed over those rows."""
    after = int(image.max()) + 1 if len(image) else 0
    return attention[0].mean(0)[after:, image].sum(0)


def _mlp_weight(layer, weight: torch.Tensor):
    """A forward hook multiplying ``layer``'s MLP output by ``weight [T']`` per token (STRing)."""
    return layer.mlp.register_forward_hook(lambda module, args, output: output * weight[None, :, None])


class _Router:
    """The routers of the MoD layers (``None``: the training-free attention score)."""

    def __init__(self, method: PMoD, layers: list[int], hidden: int):
        self.weights = None
        if method.routers is not None:
            loaded = load_routers(method.routers, layers, hidden)
            self.weights = {i: (torch.from_numpy(w), torch.from_numpy(b)) for i, (w, b) in loaded.items()}

    def weight(self, index: int, hidden: torch.Tensor, image: torch.Tensor) -> torch.Tensor | None:
        """``w [T]`` of the stream entering MoD layer ``index`` (1 for text), or None without routers."""
        if self.weights is None:
            return None
        weight, bias = self.weights[index]
        full = torch.ones(hidden.shape[1])
        full[image] = torch.tanh(torch.nn.functional.linear(hidden[0, image], weight, bias)[:, 0]) * 0.2 + 1
        return full


@torch.no_grad()
def mod_prefill(model, embeds: torch.Tensor, image: torch.Tensor, method: PMoD, score: torch.Tensor, cache):
    """Last-position logits ``[V]`` and the positions each MoD layer processed (ascending)."""
    lm = model.model.language_model
    layers = len(lm.layers)
    mod = method.check_layers(layers)
    router = _Router(method, mod, embeds.shape[2])
    hidden, length = embeds, embeds.shape[1]
    text = torch.ones(length, dtype=torch.bool)
    text[image] = False
    processed = []
    for index, layer in enumerate(lm.layers):
        keep, weight = torch.arange(length), None
        if index in mod:
            weight = router.weight(index, hidden, image)
            priority = score if weight is None else weight[image]
            ratio = max(method.decay(index, layers), method.min_ratio)
            order = torch.sort(priority, descending=True, stable=True).indices
            chosen = image[order[: official_count(len(image), ratio)]]
            keep = torch.sort(torch.cat([torch.nonzero(text)[:, 0], chosen])).values
            processed.append(keep)
        sub, ids = hidden[:, keep], keep[None]
        hook = _mlp_weight(layer, weight[keep]) if weight is not None else None
        try:
            out = layer(
                sub,
                attention_mask=causal_mask(len(keep)),
                position_ids=ids,
                cache=cache,
                position_embeddings=lm.rotary_emb(sub, ids),
            )
        finally:
            if hook is not None:
                hook.remove()
        hidden = hidden * weight[None, :, None] if weight is not None else hidden.clone()
        hidden[:, keep] = out
    return model.lm_head(lm.norm(hidden[:, -1]))[0], processed


@reference_face(PMoD)
@torch.no_grad()
def pmod_generate(model, inputs: dict, method: PMoD, new_tokens: int) -> CutResult:
    """p-MoD greedy generation for processor ``inputs`` (batch 1) on a LLaVA(-NeXT) ``model``; ``cut_positions``:
    the positions each MoD layer processed."""
    from transformers import DynamicCache

    full = attention_forward(model, inputs)
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id)[:, 0]
    first = method.check_layers(len(model.model.language_model.layers))[0]
    score = attention_score(full.attentions[first - 1], image)
    cache = DynamicCache()
    logits, processed = mod_prefill(model, full.hidden_states[0], image, method, score, cache)
    return CutResult(processed, logits, greedy(model, logits, cache, len(ids), new_tokens))


def random_routers(path, layers: list[int], hidden: int, seed: int = 0) -> None:
    """Write an ``.npz`` of random router weights (the official names) for MoD ``layers``: for tests and demos."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for i in layers:
        arrays[router_key(i, "weight")] = rng.normal(0, 0.1, (1, hidden)).astype(np.float32)
        arrays[router_key(i, "bias")] = rng.normal(0, 0.1, (1,)).astype(np.float32)
    np.savez(path, **arrays)
