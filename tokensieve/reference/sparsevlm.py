"""Eager SparseVLM on a Hugging Face LLaVA / LLaVA-NeXT model: the ground truth the exported graphs are held to.

Written from docs/methods.md#sparsevlm and the official code as read (Gumpest/SparseVLMs, not copied) on the model's
own modules, independently of the graph pass:

1. one unreduced forward gives the merged input embeddings; the raters are the text positions after the image whose
   mean (over image tokens) softmax-over-text of ``image · textᵀ`` exceeds its mean;
2. prefill layer by layer with Hugging Face's own eager attention recorded in the pruning layers; after pruning layer
   ``l``: score = mean over the rater rows of the head-mean probabilities on the image columns; a stable descending
   sort; the first ``K`` stay (ascending); version 1 clusters the next ``S`` (DPC-kNN on the layer's output, the
   host's density noise added) into ``C`` tokens placed after the kept image tokens, which are image tokens for the
   later cuts; cluster tokens are numbered ``T, T + 1, ...`` in order of creation in the kept positions;
3. the sequence after a cut runs at positions ``0..T'-1`` (version 1) or its original positions (version 2); greedy
   decoding feeds every layer at its own cache length (contiguous) or at the absolute position (original).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.methods.sparsevlm import SparseVLM, Stage
from tokensieve.reference.decoding import attention_forward, causal_mask, greedy, reference_face


@dataclass
class SparseVLMResult:
    cut_positions: list[torch.Tensor]  # per cut, the source of every row: a prompt position or T + cluster number
    prefill_logits: torch.Tensor  # [V] at the last prompt position
    ids: list[int]  # greedy new tokens

    @property
    def kept_positions(self) -> torch.Tensor:
        return self.cut_positions[-1]


def raters(embeds: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Prompt positions of the text raters from the input embeddings ``[T, D]`` and the image span."""
    relevance = torch.softmax(embeds[start:end] @ embeds[end:].T, dim=1).mean(0)
    return torch.nonzero(relevance > relevance.mean())[:, 0] + end


def dpc_knn(tokens: torch.Tensor, clusters: int, noise: torch.Tensor) -> torch.Tensor:
    """``clusters`` merged tokens of ``tokens [S, D]``: density-peak centres over the ``clusters`` nearest
    neighbours, every token to its nearest centre, a plain mean (the official ``+ 1e-6`` in the divisor)."""
    dist = (tokens[:, None] - tokens[None]).norm(dim=-1) / tokens.shape[1] ** 0.5
    nearest = torch.topk(dist, clusters, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1)) + noise
    higher = density[None, :] > density[:, None]
    parent = torch.where(higher, dist, dist.max()).min(-1).values
    centres = torch.sort(parent * density, descending=True, stable=True).indices[:clusters]
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(clusters)
    members = (assign[None, :] == torch.arange(clusters)[:, None]).to(tokens.dtype)
    return (members @ tokens) / (members.sum(1, keepdim=True) + 1e-6)


def cut(
    hidden: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, start: int, stage: Stage, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One cut on the pruning layer's output ``hidden [1, T, D]`` with its probabilities ``[1, H, T, T]``, the rater
    rows and the image run ``[start, start + stage.image)``: the new stream and the rows it takes (``-1 - j``:
    cluster ``j``)."""
    image = torch.arange(start, start + stage.image)
    score = probs[0].mean(0)[rows][:, image].mean(0)
    order = torch.sort(score, descending=True, stable=True).indices
    kept = image[torch.sort(order[: stage.kept]).values]
    before, after = torch.arange(start), torch.arange(start + stage.image, hidden.shape[1])
    take = torch.cat([before, kept, -1 - torch.arange(stage.clusters), after])
    if not stage.clusters:
        return hidden[:, take], take
    chosen = hidden[0, image[order[stage.kept : stage.kept + stage.recycled]]]
    merged = dpc_knn(chosen, stage.clusters, noise)
    return torch.cat([hidden[:, before], hidden[:, kept], merged[None], hidden[:, after]], 1), take


@torch.no_grad()
def sparse_prefill(model, embeds: torch.Tensor, image: torch.Tensor, method: SparseVLM, cache):
    """Last-position logits and each cut's row sources of the layer-by-layer prefill of ``embeds [1, T, D]``."""
    from tokensieve.reference.capture import capture_attention

    lm, length = model.model.language_model, embeds.shape[1]
    start, count = (int(image[0]), len(image)) if len(image) else (0, 0)
    rating = raters(embeds[0], start, start + count) if count else torch.zeros(0, dtype=torch.long)
    stages, scorers = method.stages(count), {layer: lm.layers[layer].self_attn for layer in method.layers}
    hidden, sources, positions, cuts = embeds, torch.arange(length), torch.arange(length), []
    with capture_attention(model, scorers.values()) as records:
        for index, layer in enumerate(lm.layers):
            ids = positions[None]
            hidden = layer(
                hidden, attention_mask=causal_mask(hidden.shape[1]), position_ids=ids, cache=cache,
                position_embeddings=lm.rotary_emb(hidden, ids),
            )  # fmt: skip
            if index not in scorers:
                continue
            g = method.layers.index(index)
            rows = torch.nonzero(torch.isin(sources, rating))[:, 0]
            noise = torch.tensor(method.density_noise(g, stages[g].recycled), dtype=hidden.dtype)
            present = hidden.shape[1]
            hidden, take = cut(hidden, records[scorers[index]]["probs"], rows, start, stages[g], noise)
            made = length + sum(s.clusters for s in stages[:g]) + torch.arange(stages[g].clusters)
            sources = torch.cat([sources, made])[torch.where(take >= 0, take, present - 1 - take)]
            positions = torch.arange(len(take)) if method.contiguous_positions else positions[take]
            cuts.append(sources)
    return model.lm_head(lm.norm(hidden[:, -1]))[0], cuts


@reference_face(SparseVLM)
@torch.no_grad()
def sparsevlm_generate(model, inputs: dict, method: SparseVLM, new_tokens: int) -> SparseVLMResult:
    """SparseVLM greedy generation for processor ``inputs`` (batch 1, one image run) on a LLaVA(-NeXT) ``model``."""
    from transformers import DynamicCache

    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id)[:, 0]
    embeds = attention_forward(model, inputs).hidden_states[0]
    cache = DynamicCache()
    logits, cuts = sparse_prefill(model, embeds, image, method, cache)
    shifts = [(first, len(ids) - len(kept)) for first, kept in zip(method.cuts, cuts, strict=True)]
    shift = tuple(shifts) if method.contiguous_positions else ()
    return SparseVLMResult(cuts, logits, greedy(model, logits, cache, len(ids), new_tokens, shift=shift))
