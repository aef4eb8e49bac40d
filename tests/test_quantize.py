"""INT8 QDQ quantization of an image-model artifact: the TensorRT recipe (symmetric QDQ, lint clean), the token
selection kept in float32, parity against the float32 eager reference within the recorded drift budget (and its
replay and gate), staged (bucketed) artifacts with every stage graph calibrated on its own inputs, and typed errors
for what it does not take."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import tokensieve
from tokensieve.cli import main
from tokensieve.errors import ArtifactError, InputError
from tokensieve.quantize.image import image_batches, quantize_artifact
from tokensieve.quantize.staged import stage_feeds


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


def test_qdq_recipe_and_float_selection(artifacts, capsys):
    artifact = artifacts["int8"]
    recipe = artifact.manifest.quantization
    assert recipe["format"] == "QDQ" and recipe["symmetric"] and recipe["images"] == 8
    assert main(["inspect", str(artifact.path)]) == 0
    assert "precision  INT8 QDQ (symmetric, on MatMul/Gemm/Conv; minmax on 8 images" in capsys.readouterr().out
    assert artifact.manifest.lint["ok"], artifact.manifest.lint["errors"][:3]
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
    with pytest.raises(ArtifactError, match="an image-model artifact"):
        quantize_artifact(llava, data, tmp_path / "e")
    calibration = str(artifacts["root"] / "calibration.npz")
    assert main(["quantize", str(llava.path), "--calibrate", calibration, "--out", str(tmp_path / "f")]) == 2
    assert not any((tmp_path / name).exists() for name in "abcdf")


def test_staged_artifact_every_stage_graph_int8_and_parity_at_the_graph_counts(zoo, tmp_path):
    path, built = zoo("timm:vit_small_patch16_224", dynamic_batch=True, img_size=112)  # 49 patch tokens
    fp32 = tokensieve.export(path, "atp(threshold=1.2)", out=tmp_path / "fp32", buckets=[16, 49])
    data = np.random.default_rng(1).standard_normal((8, 3, 112, 112)).astype(np.float32)
    feeds = stage_feeds(fp32, image_batches("pixel_values", data, None))
    stage_graphs = {p for p, _ in fp32.graph_files()} - {fp32.manifest.stages["padmax"]}
    assert set(feeds) == stage_graphs  # every bucket graph gets data, however the images route
    valid = [batch["valid"] for batch in feeds[fp32.manifest.stages["graphs"]["16"]]]
    assert all(v.shape == (4, 16) for v in valid) and any(v.all(axis=1).any() for v in valid)  # full / truncated too
    int8 = fp32.quantize(data, tmp_path / "int8", tolerance=0.15, min_agreement=0.9)
    for relative, _ in int8.graph_files():
        graph = ir.load(int8.path / relative).graph
        assert any(n.op_type == "QuantizeLinear" for n in graph), relative
        for topk in (n for n in graph if n.op_type == "TopK"):  # scores from the site's float32 nodes, or order_key
            producer = topk.inputs[0].producer()
            assert producer is None or "tokensieve.site" in producer.metadata_props, relative
    assert int8.lint().ok and all(g["lint"]["ok"] for g in int8.manifest.stages["graph_info"].values())
    assert "--int8" in (int8.path / "trt" / "build_trt10.sh").read_text()
    assert "autocast" not in (int8.path / "trt" / "build_trt11.sh").read_text()
    report = int8.parity(reference=built)
    assert report.ok, report.text()
    assert {c.label.split(" (")[0] for c in report.checks} >= {"bucketed", "oracle", "padmax"}
    assert all(c.required == 0.9 for c in report.checks if c.same_kept is not None)
    assert report.outputs[0].relative > 1e-4  # INT8 drifts: the budget passes, exact parity would not
    assert int8.replay().ok and main(["gate", str(int8.path)]) == 0
    assert not int8.replay(tolerance=1e-4).ok
    routed = int8.staged_runner().run(data[:4])
    assert routed.outputs["logits"].shape == (4, 1000) and {r.buckets[0] for r in routed.routes} <= {16, 49}


def test_two_site_staged_artifact_calibrates_every_route(zoo, hf_config_dir, tmp_path):
    path, built = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    fp32 = tokensieve.export(str(path), "atp(threshold=1.0, layers=[2, 4])", tmp_path / "fp32", buckets=[40, 104])
    data = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    feeds = stage_feeds(fp32, image_batches("pixel_values", data, None))
    stages = fp32.manifest.stages
    assert set(feeds) == {p for p, _ in fp32.graph_files()} - {stages["padmax"]}
    assert {"stage3_b40_40.onnx", "stage3_b104_40.onnx", "stage3_b104_104.onnx", "stage3_dynamic.onnx"} <= set(feeds)
    assert len(feeds["stage3_dynamic.onnx"]) == 3 * len(feeds["stage1.onnx"])  # one pass per route into site 2
    # the tiny random tower drifts far under INT8 (its token-level output most): a loose budget, the plumbing checked
    int8 = fp32.quantize(data, tmp_path / "int8", tolerance=3.0, min_agreement=0.5)
    assert int8.lint().ok
    report = int8.parity(reference=built)
    assert report.ok, report.text()
    assert all(np.isfinite(c.relative) for c in report.checks)  # every mode compared at its own counts
    assert {c.label for c in report.checks} >= {"oracle (natural counts)", "padmax (natural counts)"}
