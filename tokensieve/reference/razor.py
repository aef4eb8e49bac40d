"""Eager RazorAttention on a Hugging Face LLaVA / LLaVA-NeXT model: the ground truth of the head-class prefill and
decode graphs.

Written from docs/methods.md#razorattention, independently of the graph pass:

1. :func:`find_retrieval_heads`: the declaration's repeated random sequence through the model's own language model
   (eager attention, Hugging Face's probabilities), echo and induction scores per query head over the second copy,
   the mean of each KV group, the declaration's choice. Parity uses the heads export stored in the manifest; the
   tests hold them to this function;
2. prefill over the whole prompt with the model's own layers into a ``transformers.DynamicCache``; then every KV
   head's cache is rebuilt entry by entry from :meth:`RazorAttention.layout`: a position's key/value, the mean of
   the dropped keys/values for the compensation entry, zeros for unused entries;
3. greedy decoding at absolute positions with the model's own layers; every new token is appended to every head,
   and a per-head additive mask hides the unused entries and weighs the compensation entry by ``log D``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.methods.razor import COMPENSATION, Head, RazorAttention
from tokensieve.reference.decoding import attention_forward, eager_attention, prefill, reference_face

LOWEST = torch.finfo(torch.float32).min


@dataclass
class RazorResult:
    cache_positions: torch.Tensor  # [layers, kv_heads, T + 1]: the layout (COMPENSATION, UNUSED marks)
    compensation: torch.Tensor  # [layers, 2, kv_heads, d]: the compensation keys and values (0 where none)
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens


@torch.no_grad()
def find_retrieval_heads(model, method: RazorAttention) -> tuple[Head, ...]:
    """The retrieval heads of ``model``'s language model, found on the probe with eager attention."""
    lm, probe = model.model.language_model, method.probe
    ids = torch.tensor([method.probe_ids(model.config.text_config.vocab_size)])
    with eager_attention(model):
        attentions = lm(inputs_embeds=lm.embed_tokens(ids), output_attentions=True).attentions
    kv_heads = model.config.text_config.num_key_value_heads
    queries = torch.arange(probe, 2 * probe)
    echo, induction = [], []
    for probs in attentions:
        echo.append(probs[0][:, queries, queries - probe].mean(-1).reshape(kv_heads, -1).mean(1))
        after = queries[:-1]
        induction.append(probs[0][:, after, after - probe + 1].mean(-1).reshape(kv_heads, -1).mean(1))
    chosen = method.choose(torch.cat(echo).tolist(), torch.cat(induction).tolist())
    return tuple(divmod(index, kv_heads) for index in chosen)


def _rebuild(tensor: torch.Tensor, layouts: list[list[int]], dropped: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's keys or values ``[1, H_kv, T, d]`` laid out per head; and the compensation entry ``[H_kv, d]``."""
    heads = []
    mean = tensor[0, :, dropped].mean(1) if dropped.stop > dropped.start else torch.zeros_like(tensor[0, :, 0])
    for head, layout in enumerate(layouts):
        rows = [
            tensor[0, head, p] if p >= 0 else mean[head] if p == COMPENSATION else torch.zeros_like(mean[head])
            for p in layout
        ]
        heads.append(torch.stack(rows))
    return torch.stack(heads)[None], mean


def _bias(layouts: list[list[int]], dropped: int) -> torch.Tensor:
    """``[H_kv, T + 1]``: the additive mask of the laid-out entries."""
    table = torch.tensor(layouts)
    compensation = torch.tensor(torch.log(torch.tensor(float(dropped))).item() if dropped else LOWEST)
    return torch.where(table >= 0, 0.0, torch.where(table == COMPENSATION, compensation, LOWEST))


@reference_face(RazorAttention)
@torch.no_grad()
def razor_generate(model, inputs: dict, method: RazorAttention, new_tokens: int) -> RazorResult:
    """RazorAttention greedy generation for processor ``inputs`` (batch 1) on a LLaVA(-NeXT), with the retrieval
    heads of ``method`` (export's, from the manifest)."""
    from transformers import DynamicCache

    embeds = attention_forward(model, inputs).hidden_states[0]
    length, cache = embeds.shape[1], DynamicCache()
    logits = prefill(model, embeds, cache)
    dropped = method.dropped(length)
    span = slice(method.sink, method.sink + dropped)
    positions, compensation, biases = [], [], []
    for index, layer in enumerate(cache.layers):
        flags = method.retrieval(index, layer.keys.shape[1])
        layouts = [method.layout(length, retrieval) for retrieval in flags]
        layer.keys, key = _rebuild(layer.keys, layouts, span)
        layer.values, value = _rebuild(layer.values, layouts, span)
        positions.append(torch.tensor(layouts))
        compensation.append(torch.stack([key, value]))
        biases.append(_bias(layouts, dropped))
    ids = _greedy(model, logits, cache, biases, length, new_tokens)
    return RazorResult(torch.stack(positions), torch.stack(compensation), logits, ids)


def _greedy(model, logits, cache, biases: list[torch.Tensor], start: int, new_tokens: int) -> list[int]:
    """Greedy decoding at absolute positions, each layer's heads masked by ``biases`` (grown by the new tokens)."""
    lm = model.model.language_model
    groups = model.config.text_config.num_attention_heads // model.config.text_config.num_key_value_heads
    new: list[int] = []
    with eager_attention(model):
        for position in range(start, start + new_tokens):
            token = int(torch.argmax(logits))
            new.append(token)
            if len(new) == new_tokens:
                break
            biases = [torch.cat([b, torch.zeros(b.shape[0], 1)], dim=1) for b in biases]
            hidden, ids = lm.embed_tokens(torch.tensor([[token]])), torch.tensor([[position]])
            embeddings = lm.rotary_emb(hidden, ids)
            for layer, bias in zip(lm.layers, biases, strict=True):
                mask = bias.repeat_interleave(groups, 0)[None, :, None, :]
                hidden = layer(
                    hidden, attention_mask=mask, position_ids=ids, cache=cache, position_embeddings=embeddings
                )
            logits = model.lm_head(lm.norm(hidden[:, -1]))[0]
    return new
