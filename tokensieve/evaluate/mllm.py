"""Quality of an MLLM artifact against an unreduced one, on a JSONL of ``{"image", "prompt", "answer"}`` lines.

An MLLM artifact holds no unreduced decoder, so the baseline is a second artifact: the same source exported with
``--method none`` (``tokensieve export hf:PRESET --out DIR``; :func:`tokensieve.evaluate.sweep.sweep` exports one
itself). An unreduced artifact is its own baseline when none is given. Both generate greedily on ONNX Runtime; per
prompt the report records the greedy-token agreement (positions where both artifacts produced the same token, of
the longer of the two generations), the first divergence (the first position that differs, None when identical),
and, where the line has an ``answer``, exact match and contains (case-insensitive, surrounding punctuation
ignored) for both. Where the line has a ``continuation``, its tokens are forced through each artifact's decoding
(prefill of the prompt, then one decode step per token, with the method's compressed or evicting cache) and the
report gives the perplexity of the continuation under each (``exp`` of the mean negative log-likelihood over every
forced token). Timings are means over the prompts: prefill ms and decode ms per token of each.
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np

from tokensieve.errors import ArtifactError
from tokensieve.evaluate.data import read_prompts
from tokensieve.evaluate.report import EvalReport


def normalize(text: str) -> str:
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def compare_ids(model: list[int], baseline: list[int]) -> tuple[float, int | None]:
    """``(agreement, first divergence)`` of two greedy generations."""
    longest = max(len(model), len(baseline))
    if longest == 0:
        return 1.0, None
    same = [i < len(model) and i < len(baseline) and model[i] == baseline[i] for i in range(longest)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return sum(same) / longest, first


def _source(artifact) -> str:
    source = artifact.manifest.source
    return f"{source['kind']}:{source['name']}" if source["kind"] in ("hf", "timm") else source["name"]


def check_baseline(artifact, baseline) -> tuple[Any, list[str]]:
    """The baseline artifact (the artifact itself when it is unreduced and none is given) and notes about it."""
    if baseline is None:
        if artifact.manifest.methods:
            raise ArtifactError(
                "an MLLM artifact holds no unreduced decoder: pass --baseline DIR, the same source exported with "
                f"--method none (tokensieve export {_source(artifact)} --out DIR)"
            )
        return artifact, ["the artifact has no reduction (method none): it is its own baseline"]
    if baseline.kind != "mllm":
        raise ArtifactError(f"the baseline {baseline.path} is not an MLLM artifact; export the MLLM with --method none")
    ours, theirs = artifact.manifest.source["name"], baseline.manifest.source["name"]
    if ours != theirs:
        raise ArtifactError(f"the baseline {baseline.path} was exported from {theirs}, the artifact from {ours}")
    notes = []
    if baseline.manifest.methods:
        notes.append(f"the baseline itself is reduced ({baseline.manifest.method_text})")
    return baseline, notes


def _answer_scores(text: str, answer: str | None) -> tuple[float | None, float | None]:
    if answer is None:
        return None, None
    got, want = normalize(text), normalize(answer)
    return float(got == want), float(want in got)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def continuation_nll(runner, case) -> tuple[float, int] | None:
    """``(negative log-likelihood, tokens)`` of the case's continuation after its prompt (None without one)."""
    if not case.continuation:
        return None
    ids = runner.tokenizer.encode(case.continuation, add_special_tokens=False).ids
    if not ids:
        return None
    out = runner.generate(case.image, case.prompt, len(ids), ignore_eos=True, forced=ids)
    return -float(np.sum(out.forced_logprobs)), len(ids)


def _perplexity(values: list[tuple[float, int] | None]) -> float | None:
    kept = [v for v in values if v is not None]
    if not kept:
        return None
    return float(np.exp(sum(nll for nll, _ in kept) / sum(count for _, count in kept)))


def _case(case, model, base) -> dict[str, Any]:
    agreement, first = compare_ids(model.ids, base.ids)
    exact, contains = _answer_scores(model.text, case.answer)
    base_exact, base_contains = _answer_scores(base.text, case.answer)
    return {
        "line": case.line,
        "text": model.text,
        "baseline_text": base.text,
        "agreement": agreement,
        "first_divergence": first,
        "exact": exact,
        "contains": contains,
        "baseline_exact": base_exact,
        "baseline_contains": base_contains,
        "timings_ms": model.timings_ms,
        "baseline_timings_ms": base.timings_ms,
    }


def _timings(cases: list[dict[str, Any]]) -> dict[str, float | None]:
    out = {}
    for prefix, key in (("", "timings_ms"), ("baseline_", "baseline_timings_ms")):
        for name in ("vision", "prefill", "decode_per_token"):
            out[f"{prefix}{name}"] = _mean([c[key][name] for c in cases])
    return out


def eval_mllm(
    artifact,
    data,
    baseline=None,
    limit: int | None = None,
    new_tokens: int = 16,
    quiet: bool = True,
    save: bool = True,
) -> EvalReport:
    """Evaluate the MLLM ``artifact`` against ``baseline`` (an artifact) on the JSONL file ``data``; with ``save``,
    write ``eval.json`` into the artifact."""
    from tqdm import tqdm

    baseline, notes = check_baseline(artifact, baseline)
    prompts = read_prompts(data, limit)
    runners = (artifact.llava_runner(spin=False), baseline.llava_runner(spin=False))
    for runner in runners:  # warm-up: the first run of a session pays its allocations
        runner.generate(prompts[0].image, prompts[0].prompt, 2)
    cases = []
    for case in tqdm(prompts, desc="eval", unit="prompt", disable=quiet, leave=False):
        model, base = (r.generate(case.image, case.prompt, new_tokens) for r in runners)
        cases.append(_case(case, model, base))
        cases[-1]["nll"], cases[-1]["baseline_nll"] = (continuation_nll(r, case) for r in runners)
    diverged = [c["first_divergence"] for c in cases if c["first_divergence"] is not None]
    report = EvalReport(
        str(artifact.path),
        str(baseline.path),
        artifact.manifest.method_text,
        artifact.kind,
        "generate",
        len(cases),
        agreement=float(np.mean([c["agreement"] for c in cases])),
        accuracy=_mean([c["exact"] for c in cases]),
        baseline_accuracy=_mean([c["baseline_exact"] for c in cases]),
        metrics={
            "identical": float(np.mean([c["first_divergence"] is None for c in cases])),
            "first_divergence_mean": _mean(diverged),
            "contains": _mean([c["contains"] for c in cases]),
            "baseline_contains": _mean([c["baseline_contains"] for c in cases]),
            "perplexity": _perplexity([c["nll"] for c in cases]),
            "baseline_perplexity": _perplexity([c["baseline_nll"] for c in cases]),
        },
        timings_ms=_timings(cases),
        cases=cases,
        notes=notes,
    )
    if save:
        report.save(artifact.path)
    return report
