"""The evaluation report: quality of an artifact against its unreduced baseline (and the labels, where the data has
them), written as ``DIR/eval.json`` next to the artifact, where the registry gate reads its quality budgets.

``agreement`` is the one number a budget holds: top-1 agreement with the baseline (classifiers), mean cosine of the
pooled features (embeddings), mean correlation of the token-norm maps (dense outputs), or the share of greedy tokens
equal to the baseline's (MLLMs). ``accuracy_drop`` is the baseline's accuracy minus the artifact's (None without
labels or answers).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EVAL_FILE = "eval.json"


@dataclass
class EvalReport:
    artifact: str
    baseline: str
    method: str
    kind: str  # the artifact's kind: image | staged | mllm
    task: str  # classify | embed | dense | generate
    samples: int
    agreement: float
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    timings_ms: dict[str, float | None] = field(default_factory=dict)
    cases: list[dict[str, Any]] = field(default_factory=list)  # MLLMs: one entry per prompt
    notes: list[str] = field(default_factory=list)

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy is None or self.baseline_accuracy is None:
            return None
        return self.baseline_accuracy - self.accuracy

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop": self.accuracy_drop}

    def text(self) -> str:
        what = {
            "classify": "top-1 agreement",
            "embed": "mean cosine",
            "dense": "mean map correlation",
            "generate": "greedy-token agreement",
        }
        lines = [
            f"{self.artifact} ({self.method or 'none'}, {self.kind}, task {self.task}) vs {self.baseline}: "
            f"{self.samples} sample(s)",
            f"  {what[self.task]:<24} {self.agreement:.4f}",
        ]
        if self.accuracy is not None:
            lines.append(
                f"  {'accuracy':<24} {self.accuracy:.4f} (baseline {self.baseline_accuracy:.4f}, drop "
                f"{self.accuracy_drop:+.4f})"
            )
        lines += [f"  {key:<24} {_number(value)}" for key, value in self.metrics.items()]
        lines += [f"  {key + ' ms':<24} {_number(value)}" for key, value in self.timings_ms.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def save(self, directory: Path) -> Path:
        """Write ``eval.json`` into ``directory`` atomically."""
        from tokensieve.artifact.store import atomic_write_text

        path = Path(directory) / EVAL_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
