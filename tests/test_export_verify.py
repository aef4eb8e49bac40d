"""Export refuses, before anything is written, an artifact that would not run or could not be verified."""

from __future__ import annotations

import numpy as np
import pytest

import tokensieve
from tokensieve.errors import ExportError
from tokensieve.exporter import verify

TINY = "timm:vit_tiny_patch16_224?depth=3&img_size=64"


def test_merging_before_a_self_attention_pool_head_is_refused_and_nothing_written(tmp_path):
    """timm's parameter-free 'prr' pool (self-attention over all tokens, then a mean) has no merging reference."""
    out = tmp_path / "prr_tome"
    with pytest.raises(
        ExportError, match=r"eager reference cannot apply tome\(r=2.*AttentionPoolPrr.*nothing was written"
    ):
        tokensieve.export(f"{TINY}&global_pool=prr", "tome(r=2, layers=[1])", out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_merging_before_a_map_head_exports(tmp_path):
    """timm's latent-query attention pool ('map') gets proportional attention in the graph and the reference."""
    art = tokensieve.export(f"{TINY}&global_pool=map", "tome(r=2, layers=[1])", tmp_path / "map_tome")
    assert [s["layer"] for s in art.manifest.sites] == [1]


def test_a_graph_that_fails_at_run_time_is_refused(tmp_path, monkeypatch):
    """A graph ONNX Runtime rejects (here: the runner is made to fail as ONNX Runtime does) leaves no artifact."""

    def broken(self, feeds, outputs=None):
        raise RuntimeError(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
            "Reshape node. Name:'node_view_3'"
        )

    monkeypatch.setattr(verify.OrtRunner, "run", broken)
    out = tmp_path / "broken"
    with pytest.raises(ExportError, match=r"does not run on ONNX Runtime \(\[ONNXRuntimeError\].*node_view_3"):
        tokensieve.export(TINY, "topk(keep=0.5, layers=[1])", out)
    assert not out.exists()


def test_every_staged_route_runs_at_export(tmp_path, monkeypatch):
    """Each first-site bucket, the symbolic-K chain and pad-to-max run once before the manifest is written."""
    seen: list[str] = []
    original = verify.StagedRunner.continue_from

    def record(self, state):
        seen.append(f"{self.mode}:{sorted(set(np.asarray(state['count']).tolist()))}")
        return original(self, state)

    monkeypatch.setattr(verify.StagedRunner, "continue_from", record)
    art = tokensieve.export(TINY, "atp(threshold=0.5, layers=[1])", tmp_path / "atp", buckets=[4, 8, 16])
    assert art.kind == "staged"
    assert seen[:3] == ["bucketed:[4]", "bucketed:[8]", "bucketed:[16]"] and seen[3].startswith("oracle:")
