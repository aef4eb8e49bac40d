"""The prompt pass of an MLLM artifact on ONNX Runtime: one ``prefill`` graph, or, with ATP-LLaVA, DyVTE or MustDrop,
its segments ``prefill_0 .. prefill_n`` with the host's decision (:mod:`tokensieve.runtimes.atp_llava`,
:mod:`tokensieve.runtimes.dyvte`, :mod:`tokensieve.runtimes.mustdrop`) after each but the last: the stream and the
position ids are gathered at the kept positions and handed to the next segment (MustDrop: position ids re-indexed
``0..T'-1``, and after the last segment every layer from the first filter layer on keeps only the final positions'
keys/values)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tokensieve.methods import methods_from_dicts
from tokensieve.methods.decoder import CUT_OUTPUT, GROUP_OUTPUT, DecoderMethod
from tokensieve.methods.faces import register
from tokensieve.runtimes import FACES
from tokensieve.runtimes.kv_cache import kv_names
from tokensieve.runtimes.ort import OrtRunner

if TYPE_CHECKING:
    from tokensieve.manifest import MllmManifest

EXTRAS = ("kept_positions", "cache_positions", "cache_scores")


class Prefill:
    """``Prefill(directory, manifest, threads=2)(embeds, span) -> (logits, present, extras)``."""

    def __init__(self, directory: str | Path, manifest: MllmManifest, **options: Any):
        graphs = manifest.graphs
        methods = methods_from_dicts(manifest.methods)
        self.method = methods[0] if methods else None  # an MLLM artifact has one at most
        # the method that decides on the host between prefill segments (its "prefill_cut" face)
        methods = methods_from_dicts(manifest.methods)
        self.method = methods[0] if methods else None
        self.split = next((m for m in methods if m.host_cuts), None)
        keys = [f"prefill_{i}" for i in range(len(self.split.cuts) + 1)] if self.split else ["prefill"]
        self.graphs = [OrtRunner(Path(directory) / graphs[key], **options) for key in keys]
        self.layers: int = manifest.decoder["layers"]

    @classmethod
    def from_artifact(cls, artifact, **options: Any) -> Prefill:
        return cls(artifact.path, artifact.manifest, **options)

    def __call__(
        self,
        embeds: np.ndarray,
        span: tuple[int, int] | None = None,
        key_set: np.ndarray | None = None,
        positions: np.ndarray | None = None,
        image_positions: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray], dict[str, Any]]:
        """Last-position logits ``[V]``, the keys/values ``[key_0, value_0, key_1, ...]`` of the prompt (SnapKV /
        A2SF / H2O: compressed; MustDrop: shrunk), and the method's outputs: ``kept_positions`` (FastV; SparseVLM,
        ATP-LLaVA, DyVTE, MustDrop: after the last cut) with ``cut_positions`` (the prompt positions kept by each
        cut, a list; SparseVLM's cluster tokens as ``T + n``) and ``group_positions`` (those the layers of each decode
        cache group hold), or ``cache_positions`` (and H2O's ``cache_scores``); ``span`` = the image tokens' ``[start,
        end)``, ``key_set`` = MustDrop's protected image tokens (indices into the image), ``positions`` = the rotary
        position ids ``[rows, T]`` (default: one row ``0..T-1``; mRoPE: three), ``image_positions`` = the image
        tokens' positions when there are several images (default: ``span``'s)."""
        first = self.graphs[0]
        table = text_positions(first, embeds.shape[1]) if positions is None else positions
        out = first.run(prefill_feeds(first, embeds, span, self.method, table, image_positions))
        extras = {name: out[name] for name in EXTRAS if name in out}
        cuts = _numbered(out, GROUP_OUTPUT) or _numbered(out, CUT_OUTPUT)
        cuts = cuts or [out[k] for k in ("kept_positions",) if k in out]
        if cuts:  # FastV: one cut, in the graph; SparseVLM: several (cut_positions_<g>); p-MoD: one per MoD layer
            extras["cut_positions"] = extras["group_positions"] = cuts
            extras["kept_positions"] = cuts[-1]
        if self.split is None:
            return out["logits"][0], [out[f"present_{n}"] for n in kv_names(self.layers)], extras
        out, kept = self._segments(out, table, span or (0, 0), key_set)
        extras["cut_positions"], extras["kept_positions"] = kept, kept[-1]
        extras["group_positions"] = [kept[-1]] if self.split.final_cache else kept
        return out["logits"][0], self._present(out, [np.arange(embeds.shape[1]), *kept]), extras

    def _segments(
        self, out: dict[str, np.ndarray], table: np.ndarray, span: tuple[int, int], key_set: np.ndarray | None
    ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """Decide, gather, run the next segment (rotary positions: the columns of ``table`` kept); every segment's
        outputs and the positions kept per cut."""
        positions, image = np.arange(table.shape[1]), np.arange(*span)
        merged, kept, rule = dict(out), [], FACES.lookup("prefill_cut", self.split)
        key_set = np.arange(0) if key_set is None else key_set
        for graph in self.graphs[1:]:
            new_positions, image = rule(out, positions, image, span, self.split, key_set=key_set)
            take = np.searchsorted(positions, new_positions)
            positions = new_positions
            kept.append(positions)
            ids = np.arange(len(positions)) if self.split.contiguous_positions else positions
            feeds = {"hidden_states": out["hidden_states_out"][:, take], "position_ids": table[:, ids]}
            if "image_positions" in graph.input_names:
                feeds["image_positions"] = np.searchsorted(positions, image)
            out = graph.run(feeds)
            merged.update(out)
        return merged, kept

    def _present(self, out: dict[str, np.ndarray], segments: list[np.ndarray]) -> list[np.ndarray]:
        """The prompt's keys/values per layer (each layer's cache holds the positions of the segment it ran in);
        MustDrop (stage 3): the layers from the first filter layer on keep only the last segment's positions."""
        present = [out[f"present_{n}"] for n in kv_names(self.layers)]
        if not self.split.final_cache:
            return present
        bounds = [0, *self.split.cuts, self.layers]
        for index, start in enumerate(bounds[:-1]):
            take = np.searchsorted(segments[index], segments[-1])
            for layer in range(max(start, self.split.cache_cuts[0]), bounds[index + 1]):
                present[2 * layer] = present[2 * layer][:, :, take]
                present[2 * layer + 1] = present[2 * layer + 1][:, :, take]
        return present


def _numbered(out: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    """The graph outputs ``prefix0, prefix1, ...`` in order, up to the first missing one (none: empty): p-MoD's
    ``group_positions_<g>``, SparseVLM's ``cut_positions_<g>``."""
    values: list[np.ndarray] = []
    while f"{prefix}{len(values)}" in out:
        values.append(out[f"{prefix}{len(values)}"])
    return values


def prefill_feeds(
    runner: OrtRunner,
    embeds: np.ndarray,
    span: tuple[int, int] | None,
    method: DecoderMethod | None = None,
    positions: np.ndarray | None = None,
    image_positions: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Inputs of a prefill graph (``positions``: the rotary position ids ``[rows, T]``, default ``0..T-1`` on each
    of the graph's rows); FastV and SparseVLM graphs and the first ATP-LLaVA / DyVTE / MustDrop segment also take
    ``image_positions`` (empty without an image); the method's ``"prefill_inputs"`` face adds what else its graph
    takes (SparseVLM's density noise, Keyformer's Gumbel noise). ``image_positions`` (several images: every
    image token's position) replaces ``span``'s."""
    positions = text_positions(runner, embeds.shape[1]) if positions is None else positions
    feeds = {"inputs_embeds": embeds, "position_ids": positions}
    if "image_positions" in runner.input_names:
        image = np.arange(*(span or (0, 0))) if image_positions is None else image_positions
        feeds["image_positions"] = image.astype(np.int64)
        span = span or (0, len(image))  # what the method's extra inputs count
    return feeds | FACES.lookup("prefill_inputs", method)(runner, embeds, span, method)


def text_positions(runner: OrtRunner, length: int) -> np.ndarray:
    """``0..length-1`` on each of the rows the graph's ``position_ids`` has (mRoPE graphs: three; text positions are
    the same on every row)."""
    rows = next(int(i.shape[0]) for i in runner.session.get_inputs() if i.name == "position_ids")
    return np.broadcast_to(np.arange(length, dtype=np.int64), (rows, length))


@register("prefill_inputs", DecoderMethod, type(None))
def host_inputs(
    runner: OrtRunner, embeds: np.ndarray, span: tuple[int, int] | None, method: DecoderMethod | None
) -> dict[str, np.ndarray]:
    """The inputs a method's prefill graph takes besides the prompt: what its declaration's ``host_inputs`` gives for
    the image's token count, as float32 (none by default; SparseVLM: its density noise)."""
    if method is None:
        return {}
    image = 0 if span is None else span[1] - span[0]
    return {name: np.asarray(values, np.float32) for name, values in method.host_inputs(image).items()}
