"""Atomic artifact writes, the ONNX Runtime runner, MAC counts, and the no-torch import rule."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import tokensieve
from tokensieve.errors import ArtifactError, GraphRewriteError, InputError, RuntimeBackendError

METHOD = "topk(keep=0.7, layers=[3,6,9])"


@pytest.fixture(scope="module")
def artifact(zoo, tmp_path_factory):
    path, _ = zoo("timm:vit_small_patch16_224")
    return tokensieve.export(str(path), METHOD, tmp_path_factory.mktemp("art") / "a")


def test_failed_export_leaves_existing_artifact_untouched(artifact, monkeypatch, zoo):
    before = json.loads((artifact.path / "manifest.json").read_text())

    def broken(path):
        raise GraphRewriteError("injected failure after the graphs were written")

    monkeypatch.setattr("tokensieve.exporter.image.check_file", broken)
    with pytest.raises(GraphRewriteError, match="injected"):
        tokensieve.export(str(zoo("timm:vit_small_patch16_224")[0]), "topk(keep=0.5, layers=[1])", artifact.path)
    assert json.loads((artifact.path / "manifest.json").read_text()) == before
    assert not [p for p in artifact.path.parent.iterdir() if p.name.startswith(".")]


def test_reexport_replaces_an_artifact(zoo, tmp_path):
    path, _ = zoo("timm:vit_small_patch16_224")
    first = tokensieve.export(str(path), METHOD, tmp_path / "a")
    second = tokensieve.export(str(path), "topk(keep=0.5, layers=[2])", tmp_path / "a")
    assert first.path == second.path and second.manifest.sites[0]["params"]["kept"] == 98
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_artifact_run_and_providers(artifact):
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    out = artifact.run(x)
    assert out["logits"].shape == (1, 1000)
    runner = artifact.runner()
    assert runner.active == ["CPUExecutionProvider"] and not runner.fell_back
    nan = x.copy()
    nan[0, 0, 0, 0] = np.nan
    for bad, message in (
        ({"pixel_values": x}, "must be a numpy float32 array [N, 3, 224, 224], got dict"),
        (x.astype(np.float64), "must be float32"),
        (x[:, :, :100], "must be [N, 3, 224, 224], got [1, 3, 100, 224]"),
        (np.concatenate([x, x]), "static batch of 1, got 2 images; export with --dynamic-batch"),
        (nan, "NaN or infinite"),
    ):
        with pytest.raises(InputError, match=re.escape(message)):
            artifact.run(bad)
    with pytest.raises(ArtifactError, match="has no graph 'nope'; its graphs: model, baseline"):
        artifact.run(x, graph="nope")
    with pytest.raises(ArtifactError, match="bench_artifact of an image-model artifact takes no contexts"):
        artifact.bench(contexts=[8])


def test_requested_gpu_provider_fallback_is_reported(artifact):
    runner = artifact.runner(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if "CUDAExecutionProvider" in runner.active:
        pytest.skip("a CUDA provider is really available here")
    assert runner.fell_back and runner.active == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeBackendError, match="not available"):
        artifact.runner(providers=["CUDAExecutionProvider"], require=True)


def test_macs_match_the_analytic_count(artifact):
    n, c, depth = 197, 384, 12
    block = n * c * 3 * c + 2 * n * n * c + n * c * c + 2 * n * c * 4 * c
    baseline = 196 * c * 3 * 16 * 16 + depth * block + c * 1000
    assert artifact.manifest.macs["baseline"] == baseline
    macs = artifact.manifest.macs
    assert macs["limit_speedup"] == pytest.approx(macs["baseline"] / macs["model"], abs=1e-4)


def test_graph_passes_and_runtimes_work_without_torch(artifact):
    """A deployment box may have only onnxruntime: block torch and run pass + runner."""
    code = f"""
import sys
sys.modules['torch'] = None
import onnx_ir as ir
from tokensieve.graph_passes import run_passes
from tokensieve.graph_passes.token_reduction import TokenReductionPass
from tokensieve.graph_passes.lint import lint
from tokensieve.methods import parse_methods
from tokensieve.runtimes.ort import OrtRunner
model = ir.load({str(artifact.graph_path("baseline"))!r})
run_passes(model, [TokenReductionPass(parse_methods('topk(keep=0.5, layers=[1]) + tome(r=4, layers=[2, 3])'))])
assert lint(model).ok
runner = OrtRunner({str(artifact.graph_path("model"))!r})
loaded = [m for m in sys.modules if sys.modules[m] is not None]
print(any(m.startswith('tokensieve.reference') for m in loaded), 'torch' in loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
