"""Jetson bundles (`tokensieve jetson`): the artifact plus trtexec build / check scripts for the JetPack's TensorRT.
The scripts run here against stand-ins for trtexec and Polygraphy that record their arguments and write the plans."""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

import tokensieve
from tokensieve.artifact.store import file_digests
from tokensieve.cli import main
from tokensieve.errors import ArtifactError
from tokensieve.gate import gate
from tokensieve.parity.image import golden_output_scale

FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "$@" >> "$CALLS"
for arg in "$@"; do case "$arg" in --saveEngine=*) echo plan > "${arg#--saveEngine=}";; esac; done
"""
FAKE_POLYGRAPHY = """#!/usr/bin/env bash
echo "polygraphy $@" >> "$CALLS"
"""


def _tools(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("trtexec", FAKE_TRTEXEC), ("polygraphy", FAKE_POLYGRAPHY)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    # no tokensieve on this PATH: check.sh falls back to Polygraphy
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TRTEXEC": str(bin_dir / "trtexec"), "CALLS": str(calls)}
    return env, calls


def _run(script, env):
    result = subprocess.run(["bash", f"jetson/{script}"], cwd=env["BUNDLE"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_single_graph_bundle_builds_checks_and_stays_an_artifact(zoo, hf_config_dir, tmp_path, capsys):
    path, built = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "topk(keep=0.5, layers=[2])", tmp_path / "a")
    assert artifact.parity(reference=built).ok  # writes golden/
    bundle = tmp_path / "bundle"
    assert main(["jetson", str(artifact.path), "--out", str(bundle), "--jetpack", "6.2", "--fp16"]) == 0
    assert "TensorRT 10.3, Orin" in capsys.readouterr().out
    info = json.loads((bundle / "jetson" / "bundle.json").read_text())
    assert info["lint"] == {"target": "trt10.3", "ok": True, "warnings": info["lint"]["warnings"]}
    assert [g["onnx"] for g in info["graphs"]] == ["model.onnx", "baseline.onnx"]
    env, calls = _tools(tmp_path)
    env["BUNDLE"] = str(bundle)
    _run("build_engines.sh", env)
    builds = calls.read_text().splitlines()
    assert len(builds) == 2 and all("--fp16" in line for line in builds)
    assert "--minShapes=pixel_values:1x3x224x224 --optShapes=pixel_values:8x3x224x224" in builds[0]
    assert "--maxShapes=pixel_values:8x3x224x224" in builds[0]
    build = json.loads((bundle / "engines" / "build.json").read_text())
    assert build["ranges"]["batch"] == [1, 8, 8] and build["fp16"] and build["tensorrt"] == "unknown"
    assert build["tf32"] is True and build["engines"]["model.onnx"]["tf32"] is True  # trtexec's default, recorded
    assert (bundle / "engines" / "model.plan").read_text() == "plan\n"
    calls.unlink()
    _run("check.sh", env)
    checks = calls.read_text().splitlines()
    assert checks[0] == "--loadEngine=engines/model.plan --shapes=pixel_values:8x3x224x224"
    assert checks[-1].startswith("polygraphy run engines/model.plan --model-type engine --trt")
    assert "--load-outputs golden/eager_outputs.json --atol " in checks[-1] and checks[-1].endswith("--rtol 0")
    assert float(checks[-1].split("--atol ")[1].split()[0]) == pytest.approx(1e-2 * golden_output_scale(artifact), 1e-3)
    assert (
        "tokensieve parity . --replay --runtime tensorrt --tolerance 0.01" in (bundle / "jetson/check.sh").read_text()
    )
    # the bundle folder is the artifact: it loads, its recorded digests and golden replay pass the gate, and the
    # engines the script wrote serve through `tokensieve triton --backend tensorrt`
    report = gate([bundle])
    assert report.ok, report.text()
    copy = tokensieve.load(bundle)
    assert copy.triton(tmp_path / "repo", backend="tensorrt") == ["bundle"]
    assert (tmp_path / "repo" / "bundle" / "1" / "model.plan").is_file()


def test_staged_bundle_archive(zoo, hf_config_dir, tmp_path):
    path, _ = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "atp(threshold=1.0, layers=[2, 4])", tmp_path / "a", buckets=[40, 104])
    (artifact.path / "engines").mkdir()  # engines built elsewhere stay out of the bundle
    (artifact.path / "engines" / "stage1.plan").write_text("other device")
    info = artifact.jetson(tmp_path / "out" / "vit_atp.tar.gz", jetpack="7.2", max_batch=4)
    assert info["tensorrt"] == "10.16" and info["lint"]["target"] == "trt10"
    graphs = {g["onnx"]: g["profile"] for g in info["graphs"]}
    assert len(graphs) == len(artifact.graph_files()) + 1 and "baseline.onnx" in graphs  # the bench reference too
    # the symbolic-K chain after the first site: tokens and candidates follow the buckets
    assert graphs["stage3_dynamic.onnx"]["tokens"] == [[1, 41, 192], [4, 105, 192], [4, 105, 192]]
    assert graphs["stage3_dynamic.onnx"]["order_key"] == [[1, 40], [4, 104], [4, 104]]
    assert sorted(os.listdir(tmp_path / "out")) == ["vit_atp.tar.gz"]  # no scratch folder left
    with tarfile.open(tmp_path / "out" / "vit_atp.tar.gz") as tar:
        names = tar.getnames()
        script = tar.extractfile("vit_atp/jetson/build_engines.sh").read().decode()
    assert "vit_atp/manifest.json" in names and "vit_atp/jetson/check.sh" in names
    assert not [n for n in names if "/engines" in n]
    # the artifact's own recipes (batch 32, bare trtexec) stay out: jetson/build_engines.sh is the bundle's recipe
    assert (artifact.path / "trt" / "build_trt10.sh").is_file() and not [n for n in names if "/trt/" in n]
    assert script.count("--saveEngine=") == len(graphs) and "--fp16" not in script


def test_quantized_bundle_builds_int8_and_checks_within_the_drift_budget(zoo, hf_config_dir, tmp_path):
    path, built = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    fp32 = tokensieve.export(str(path), "topk(keep=0.5, layers=[2])", tmp_path / "fp32")
    data = np.random.default_rng(0).standard_normal((8, *fp32.manifest.inputs[0]["shape"][1:]), dtype=np.float32)
    # the tiny random tower drifts far under INT8 (its token-level output most): the budget is set to pass here
    int8 = fp32.quantize(data, tmp_path / "int8", tolerance=2.0, min_agreement=0.5)
    assert int8.parity(reference=built).ok  # golden files with the drift budget
    env, calls = _tools(tmp_path)
    for jetpack, flagged in (("6.2", True), ("7.2.2", False)):
        bundle = tmp_path / f"jp{jetpack}"
        info = int8.jetson(bundle, jetpack=jetpack)
        assert info["int8"] is flagged
        env["BUNDLE"] = str(bundle)
        calls.unlink(missing_ok=True)
        _run("build_engines.sh", env)
        builds = calls.read_text().splitlines()
        assert len(builds) == 2 and all(("--int8" in line) is flagged for line in builds)  # model and baseline
        build = json.loads((bundle / "engines" / "build.json").read_text())
        assert build["int8"] is flagged and build["tf32"] is (True if flagged else None)  # TensorRT 11: typed
    check = (bundle / "jetson" / "check.sh").read_text()
    assert "tokensieve parity . --replay --runtime tensorrt --tolerance 2;" in check  # the recorded budget
    atol = float(check.split("--atol ")[1].split()[0])
    assert atol == pytest.approx(2.0 * golden_output_scale(int8), rel=1e-3)  # relative budget -> absolute bound


def test_dla_bundles_fix_the_batch_of_static_graphs_and_keep_the_rest_on_the_gpu(zoo, hf_config_dir, tmp_path):
    path, built = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    staged = tokensieve.export(str(path), "atp(threshold=1.0, layers=[2])", tmp_path / "a", buckets=[40, 104])
    assert staged.parity(reference=built).ok  # golden/staged.npz: check.sh replays it on the engines
    bundle = tmp_path / "dla"
    cli = ["jetson", str(staged.path), "--out", str(bundle), "--fp16", "--dla", "1", "--dla-batch", "2"]
    assert main(cli) == 0
    info = json.loads((bundle / "jetson" / "bundle.json").read_text())
    assert info["dla"]["core"] == 1 and info["dla"]["batch"] == 2
    assert info["dla"]["gpu_graphs"] == ["stage2_dynamic.onnx"]  # the symbolic-K graph keeps its profile
    assert set(info["dla"]["graphs"]) == {
        "stage1.onnx",
        "stage2_b40.onnx",
        "stage2_b104.onnx",
        "padmax.onnx",
        "baseline.onnx",
    }
    env, calls = _tools(tmp_path)
    env["BUNDLE"] = str(bundle)
    _run("build_engines.sh", env)
    builds = {line.split()[0]: line for line in calls.read_text().splitlines()}
    stage = builds["--onnx=stage2_b40.onnx"]
    assert "--useDLACore=1 --allowGPUFallback" in stage and "--fp16" in stage
    fixed = "tokens:2x197x192,order_key:2x196,valid:2x40"
    assert all(f"--{kind}Shapes={fixed}" in stage for kind in ("min", "opt", "max"))  # static: min = opt = max
    assert "--useDLACore" not in builds["--onnx=stage2_dynamic.onnx"]
    assert json.loads((bundle / "engines" / "build.json").read_text())["engines"]["stage1.onnx"]["dla_core"] == 1
    calls.unlink()
    _run("check.sh", env)
    assert any(
        line.startswith("--loadEngine=engines/stage1.plan") and line.endswith("--useDLACore=1")
        for line in calls.read_text().splitlines()
    )
    check = (bundle / "jetson" / "check.sh").read_text()
    assert "then tokensieve parity . --replay --runtime tensorrt --tolerance 0.01;" in check
    assert "install tokensieve on the device" in check  # no Polygraphy fallback for the dispatcher
    recorded = json.loads((bundle / "manifest.json").read_text())["files"]
    assert file_digests(bundle, recorded) == recorded  # the manifest no longer records the left-out trt/ recipes
    assert not (bundle / "trt").exists() and not [name for name in recorded if name.startswith("trt/")]
    with pytest.raises(ArtifactError, match="FP16 or INT8 only"):
        staged.jetson(tmp_path / "x", dla=0)
    with pytest.raises(ArtifactError, match=r"JetPack 7\.1 has no DLA"):
        staged.jetson(tmp_path / "x", jetpack="7.1", fp16=True, dla=0)
    assert not (tmp_path / "x").exists()


def test_bad_requests(zoo, hf_config_dir, tmp_path):
    path, _ = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "topk(keep=0.5, layers=[2])", tmp_path / "a")
    with pytest.raises(ArtifactError, match=r"unknown JetPack '5\.1'"):
        artifact.jetson(tmp_path / "b", jetpack="5.1")
    with pytest.raises(ArtifactError, match=r"TensorRT 11\.4\.1, which has no --fp16"):
        artifact.jetson(tmp_path / "b", jetpack="7.2.2", fp16=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["jetson", str(artifact.path), "--out", str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and not (tmp_path / "b").exists()
    newer, _ = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True, opset=21)
    opset21 = tokensieve.export(str(newer), "topk(keep=0.5, layers=[2])", tmp_path / "c")
    with pytest.raises(ArtifactError, match=r"fail the trt10\.3 lint that JetPack 6\.2"):
        opset21.jetson(tmp_path / "b")
    assert opset21.jetson(tmp_path / "b", jetpack="7.2")["lint"]["target"] == "trt10"


def test_dla_check_replays_goldens_at_the_engine_batch(zoo, hf_config_dir, tmp_path):
    """Issue 27 item 3: golden files of batch 2 on an engine built for batch 1 (min = opt = max) are replayed in
    iterations of the engine's batch."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    path, built = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "topk(keep=0.5, layers=[2])", tmp_path / "a")
    assert artifact.parity(reference=built, batch=3).ok
    bundle = tmp_path / "dla"
    artifact.jetson(bundle, fp16=True, dla=0, dla_batch=2)
    env, calls = _tools(tmp_path)
    env["BUNDLE"] = str(bundle)
    _run("build_engines.sh", env)
    profile = json.loads((bundle / "engines" / "build.json").read_text())["engines"]["model.onnx"]["profile"]
    batch = {shape[0] for shape in profile["pixel_values"]}
    assert batch == {2}  # the engine's batch: min = opt = max
    calls.unlink()
    _run("check.sh", env)
    replay = calls.read_text().splitlines()[-1]
    assert "--load-inputs jetson/golden/inputs.json --load-outputs jetson/golden/eager_outputs.json" in replay
    iterations = load_json(str(bundle / "jetson" / "golden" / "inputs.json"))
    assert [len(feed["pixel_values"]) for feed in iterations] == [2, 2]  # 3 golden images, the last one repeated
    eager = RunResults.load(str(bundle / "jetson" / "golden" / "eager_outputs.json"))[0][1]
    golden = RunResults.load(str(artifact.path / "golden" / "eager_outputs.json"))[0][1][0]
    name = next(iter(golden.keys()))
    np.testing.assert_array_equal(np.concatenate([it[name] for it in eager])[:3], golden[name])


def test_mllm_check_times_engines_on_a_real_prompt(tmp_path):
    """Issue 27 items 4 and 11: an evicting method prefills the whole prompt, so check.sh runs every engine at the
    shapes of a real generation, with its recorded inputs (trtexec's random INT64 would be out-of-range slots)."""
    artifact = tokensieve.export("hf:llava-tiny", "h2o(budget=40, recent=8)", out=tmp_path / "h2o")
    capacity = artifact.manifest.decoder["capacity"]
    info = artifact.jetson(tmp_path / "bundle")
    bundle = tmp_path / "bundle"
    jobs = {job["onnx"]: job for job in info["graphs"]}
    assert all(job["inputs"] for job in jobs.values())  # every graph ran in the generation
    prefill = jobs[artifact.manifest.graphs["prefill"]]
    length = prefill["inputs"]["inputs_embeds"]["shape"][1]
    assert length > capacity and prefill["profile"]["inputs_embeds"][2][1] >= length
    for job in jobs.values():
        for name, value in job["inputs"].items():
            data = np.fromfile(bundle / value["file"], dtype=value["dtype"]).reshape(value["shape"])
            if name == "cache_position":  # the ScatterND write slot of the fixed-capacity decode graph
                assert data.min() >= 0 and data.max() < capacity
    env, calls = _tools(tmp_path)
    env["BUNDLE"] = str(bundle)
    _run("check.sh", env)
    lines = calls.read_text().splitlines()
    assert len(lines) == len(jobs) and all("--loadInputs=" in line for line in lines)
    line = next(line for line in lines if f"--loadEngine=engines/{Path(prefill['onnx']).stem}.plan" in line)
    assert f"inputs_embeds:1x{length}x" in line


def test_a_dla_core_takes_at_most_16_loadables():
    from tokensieve.deploy.dla import LOADABLES_PER_CORE, limit_loadables

    gpu = [{"onnx": f"g{i}.onnx", "profile": {}} for i in range(20)]
    dla = [{**job, "dla_core": 0} for job in gpu[:19]] + [gpu[19]]
    placed = limit_loadables(gpu, dla)
    assert sum("dla_core" in job for job in placed) == LOADABLES_PER_CORE == 16
    assert [job["onnx"] for job in placed if job.get("dla_over_limit")] == ["g16.onnx", "g17.onnx", "g18.onnx"]
