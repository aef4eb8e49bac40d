"""INT8 QDQ quantization of an image-model artifact: the TensorRT recipe (symmetric QDQ, lint clean), the token
selection kept in float32, parity against the float32 eager reference within the recorded drift budget (and its
replay and gate), and typed errors for what it does not take."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import tokensieve
from tokensieve.calibration.quantize import quantize_artifact
from tokensieve.cli import main
from tokensieve.errors import ArtifactError, InputError


@pytest.fixture(scope="module")
def artifacts(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    path, built = zoo("timm:vit_small_patch16_224")
    fp32 = tokensieve.export(path, "topk(keep=0.5, layers=[3, 6, 9])", out=root / "fp32")
    data = np.random.default_rng(1).standard_normal((8, 3, 224, 224)).astype(np.float32)
    np.savez(root / "calibration.npz", pixel_values=data)
    cli = ["quantize", str(root / "fp32"), "--calibrate", str(root / "calibration.npz"), "--out", str(root / "int8")]
    assert main([*cli, "--tolerance", "0.15", "--min-agreement", "0.9", "--no-parity"]) == 0
    return {"fp32": fp32, "int8": tokensieve.load(root / "int8"), "root": root, "data": data, "built": built}


def test_qdq_recipe_and_float_selection(artifacts):
    artifact = artifacts["int8"]
    recipe = artifact.manifest["quantization"]
    assert recipe["format"] == "QDQ" and recipe["symmetric"] and recipe["images"] == 8
    assert artifact.manifest["lint"]["ok"], artifact.manifest["lint"]["errors"][:3]
    graph = ir.load(artifact.path / "model.onnx").graph
    quantizers = [n for n in graph if n.op_type == "QuantizeLinear"]
    assert quantizers and all(int(n.inputs[2].const_value.numpy()) == 0 for n in quantizers if len(n.inputs) > 2)
    matmuls = [n for n in graph if n.op_type == "MatMul" and "tokensieve.site" not in n.metadata_props]
    fed = [n for n in matmuls if any(i.producer() and i.producer().op_type == "DequantizeLinear" for i in n.inputs)]
    assert len(fed) == len(matmuls)  # every model MatMul reads dequantized INT8 operands
    for topk in (n for n in graph if n.op_type == "TopK"):  # the scores are computed by the site, in float32
        assert "tokensieve.site" in topk.inputs[0].producer().metadata_props

    def site_ops(nodes) -> list[str]:
        return sorted(n.op_type for n in nodes if "tokensieve.site" in n.metadata_props)

    original = ir.load(artifacts["fp32"].path / "model.onnx").graph
    assert site_ops(graph) == site_ops(original)  # the selection is untouched
    assert (artifact.path / "baseline.onnx").is_file() and not (artifact.path / "weights.data").exists()


def test_parity_within_the_drift_budget_and_replay(artifacts):
    artifact = artifacts["int8"]
    report = artifact.parity(reference=artifacts["built"])
    assert report.tolerance == 0.15 and all(site.required == 0.9 for site in report.sites)
    assert report.ok, report.text()
    assert report.outputs[0].relative > 1e-4  # INT8 does drift: the budget, not exactness, is what passes
    assert artifact.replay().ok
    assert not artifact.parity(reference=artifacts["built"], tolerance=1e-4, golden=False).ok
    assert main(["gate", str(artifact.path)]) == 0
    out = artifact.run(artifacts["data"][:1])
    assert next(iter(out.values())).shape == (1, 1000)


def test_bad_requests_are_typed_errors(artifacts, tmp_path):
    data = artifacts["data"]
    with pytest.raises(InputError, match=r"the graph takes \[N, 3, 224, 224\]"):
        quantize_artifact(artifacts["fp32"], data[:, :, :112], tmp_path / "a")
    with pytest.raises(InputError, match="at least 2 images"):
        quantize_artifact(artifacts["fp32"], data[:1], tmp_path / "b")
    with pytest.raises(InputError, match="unknown calibration"):
        quantize_artifact(artifacts["fp32"], data, tmp_path / "c", calibration="kl")
    with pytest.raises(ArtifactError, match="already quantized"):
        quantize_artifact(artifacts["int8"], data, tmp_path / "d")
    llava = tokensieve.export("hf:llava-tiny", out=tmp_path / "llava")
    with pytest.raises(ArtifactError, match="single-graph image-model artifact"):
        quantize_artifact(llava, data, tmp_path / "e")
    calibration = str(artifacts["root"] / "calibration.npz")
    assert main(["quantize", str(llava.path), "--calibrate", calibration, "--out", str(tmp_path / "f")]) == 2
    assert not any((tmp_path / name).exists() for name in "abcdf")
