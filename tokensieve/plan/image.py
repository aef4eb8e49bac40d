"""``tokensieve plan``: tokens per block and MACs of candidate methods/schedules, before writing any artifact.

The unreduced graph is exported (or loaded) once; each candidate is then inserted into a fresh copy in memory and
its MACs are counted from the rewritten graph, so the numbers include the selection and matching cost (score rows,
similarity matrices, one-hot merges) exactly as the exported artifact will have them. Pick ``r`` (or ``keep``) for a
MAC budget, then ``tokensieve export`` the winner.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.drop_zero_masks import DropZeroMaskPass
from tokensieve.graph_passes.locate import locate_vit
from tokensieve.graph_passes.macs import count_macs
from tokensieve.graph_passes.propagate import propagate_shapes
from tokensieve.graph_passes.token_reduction import TokenReductionPass
from tokensieve.methods import describe, parse_methods, schedule


@dataclass
class PlanRow:
    method: str
    tokens_per_block: list[int]
    final_tokens: int
    gmacs: float
    limit_speedup: float


def _baseline_path(source: str, directory: Path, **export_options) -> Path:
    """An unreduced ONNX file for ``source``: an artifact's baseline, an .onnx file, or a fresh export."""
    path = Path(source)
    if path.is_dir():
        from tokensieve.artifact.store import Artifact

        return Artifact.load(path).graph_path("baseline")
    if path.suffix == ".onnx":
        return path
    from tokensieve.exporter.dispatch import export

    return export(source, None, directory / "baseline", **export_options).graph_path("model")


def plan(source: str, candidates: list[str], specials: int | None = None, **export_options) -> list[PlanRow]:
    """One row for the unreduced model, then one per candidate method string."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _baseline_path(source, Path(tmp), **export_options)

        def fresh() -> ir.Model:
            model = ir.load(path)
            propagate_shapes(model)
            DropZeroMaskPass()(model)
            return model

        base = fresh()
        layout = locate_vit(base, specials)
        base_macs = count_macs(base)
        rows = [PlanRow("none", [layout.tokens] * layout.depth, layout.tokens, base_macs / 1e9, 1.0)]
        for text in candidates:
            methods = parse_methods(text)
            planned = schedule(methods, layout.tokens, layout.specials, layout.depth)
            model = fresh()
            run_passes(model, [TokenReductionPass(methods, specials=layout.specials), RemoveUnusedNodesPass()])
            macs = count_macs(model)
            final = planned.sites[-1][1].tokens_out if planned.sites else layout.tokens
            rows.append(PlanRow(describe(methods), planned.entering, final, macs / 1e9, base_macs / macs))
    return rows


def format_plan(rows: list[PlanRow]) -> str:
    width = max(len(r.method) for r in rows)
    lines = [f"{'method':<{width}}  GMACs/sample  MAC-limit speedup  tokens entering each block"]
    for r in rows:
        lines.append(
            f"{r.method:<{width}}  {r.gmacs:>12.3f}  {r.limit_speedup:>16.3f}x  "
            f"{' '.join(map(str, r.tokens_per_block))} -> {r.final_tokens}"
        )
    return "\n".join(lines)


def plan_dicts(rows: list[PlanRow]) -> list[dict]:
    return [asdict(r) for r in rows]
