"""The prompt pass of an MLLM artifact on ONNX Runtime: one ``prefill`` graph, or, with ATP-LLaVA, ``prefill_head``
(layers before ``k`` and the image tokens' scores), the host's decision (:mod:`tokensieve.runtimes.atp_llava`) and
``prefill_tail`` (layers from ``k`` on the kept positions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tokensieve.methods import methods_from_dicts
from tokensieve.methods.atp_llava import ATPLLaVA
from tokensieve.runtimes.atp_llava import kept_positions
from tokensieve.runtimes.kv_cache import kv_names
from tokensieve.runtimes.ort import OrtRunner

EXTRAS = ("kept_positions", "cache_positions", "cache_scores")


class Prefill:
    """``Prefill(directory, manifest, threads=2)(embeds, span) -> (logits, present, extras)``."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any], **options: Any):
        graphs = manifest["graphs"]
        self.split = next((m for m in methods_from_dicts(manifest.get("methods")) if isinstance(m, ATPLLaVA)), None)
        keys = ("prefill_head", "prefill_tail") if self.split else ("prefill",)
        self.graphs = [OrtRunner(Path(directory) / graphs[key], **options) for key in keys]
        self.layers: int = manifest["decoder"]["layers"]

    @classmethod
    def from_artifact(cls, artifact, **options: Any) -> Prefill:
        return cls(artifact.path, artifact.manifest, **options)

    def __call__(
        self, embeds: np.ndarray, span: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
        """Last-position logits ``[V]``, the keys/values ``[key_0, value_0, key_1, ...]`` of the prompt (SnapKV /
        A2SF / H2O: compressed), and the method's outputs: ``kept_positions`` (FastV, ATP-LLaVA) or
        ``cache_positions`` (and H2O's ``cache_scores``); ``span`` = the image tokens' ``[start, end)``."""
        first = self.graphs[0]
        out = first.run(prefill_feeds(first, embeds, span))
        if self.split is not None:  # ATP-LLaVA: scores -> kept positions -> the layers from k on
            scores = out["image_self_score"], out["image_cross_score"]
            keep = kept_positions(*scores, span, embeds.shape[1], self.split)
            tail = {"hidden_states": out["hidden_states"][:, keep], "position_ids": keep[None]}
            out = {**out, **self.graphs[1].run(tail), "kept_positions": keep}
        present = [out[f"present_{n}"] for n in kv_names(self.layers)]
        return out["logits"][0], present, {name: out[name] for name in EXTRAS if name in out}


def prefill_feeds(runner: OrtRunner, embeds: np.ndarray, span: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """Inputs of a prefill graph; FastV and ATP-LLaVA graphs also take ``image_positions`` (empty without an
    image)."""
    feeds = {"inputs_embeds": embeds, "position_ids": np.arange(embeds.shape[1], dtype=np.int64)[None]}
    if "image_positions" in runner.input_names:
        feeds["image_positions"] = np.arange(*(span or (0, 0)), dtype=np.int64)
    return feeds
