"""``tokensieve eval`` and ``tokensieve sweep``: quality against the unreduced model (image classifiers, embeddings,
dense maps, MLLM generation), method-strength sweeps and the quality / latency Pareto chart."""

from __future__ import annotations

from typing import Any

from tokensieve.evaluate.report import EVAL_FILE, EvalReport

__all__ = ["EVAL_FILE", "EvalReport", "evaluate"]


def evaluate(artifact, data, baseline=None, **kwargs: Any) -> EvalReport:
    """Evaluate ``artifact`` on ``data``: :func:`tokensieve.evaluate.mllm.eval_mllm` for an MLLM (``baseline``: the
    unreduced artifact), :func:`tokensieve.evaluate.image.eval_image` otherwise (its own baseline graph)."""
    from tokensieve.errors import OptionError

    if artifact.kind == "mllm":
        from tokensieve.evaluate.mllm import eval_mllm

        if kwargs.get("task") not in (None, "generate"):
            raise OptionError(f"an MLLM artifact is evaluated on generation; --task {kwargs['task']} does not apply")
        kwargs.pop("task", None)
        return eval_mllm(artifact, data, baseline, **kwargs)
    if baseline is not None:
        raise OptionError("an image-model artifact holds its own baseline graph; --baseline applies to MLLMs only")
    kwargs.pop("new_tokens", None)
    from tokensieve.evaluate.image import eval_image

    return eval_image(artifact, data, **kwargs)
