"""The parity check and its torch-free replay for each artifact kind (``Artifact.kind``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokensieve.parity.image import check_parity, replay_golden
from tokensieve.parity.mllm import check_llava_parity, replay_llava_golden

CHECK: dict[str, Callable[..., Any]] = {"image": check_parity, "staged": check_parity, "mllm": check_llava_parity}
REPLAY: dict[str, Callable[..., Any]] = {"image": replay_golden, "staged": replay_golden, "mllm": replay_llava_golden}


def replay(artifact: Any, **options: Any) -> Any:
    """Parity against the golden files ``parity`` wrote, without torch or the eager model."""
    return REPLAY[artifact.kind](artifact, **options)
