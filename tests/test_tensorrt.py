"""TensorRT engines (``tokensieve build``): the optimization profiles every graph gets (CPU), the clear errors where
TensorRT or an engine is missing (CPU, skipped where TensorRT is installed), and on a machine with TensorRT and a
GPU the build, the golden replay and the benchmark on the engines (skipped elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import pytest

import tokensieve
from tokensieve.bench.image import bench_staged
from tokensieve.cli import main
from tokensieve.deploy.build import graph_paths, input_profile, symbol_ranges
from tokensieve.errors import ArtifactError, RuntimeBackendError
from tokensieve.manifest import MllmManifest
from tokensieve.runtimes.ort import OrtRunner
from tokensieve.runtimes.tensorrt import POLYGRAPHY_FLOOR, TensorRTRunner, build_engine, tensorrt_version

TRT = tensorrt_version() is not None


@pytest.fixture(scope="module")
def vit(zoo, tmp_path_factory):
    path, _ = zoo("timm:vit_small_patch16_224", dynamic_batch=True)
    return tokensieve.export(path, "topk(keep=0.5, layers=[3])", out=tmp_path_factory.mktemp("trt") / "vit")


def test_vit_profile_covers_the_dynamic_batch(vit):
    assert graph_paths(vit) == ["model.onnx", "baseline.onnx"]
    ranges = symbol_ranges(vit, max_batch=16)
    profile = input_profile(vit.path / "model.onnx", ranges)
    assert profile == {"pixel_values": ([1, 3, 224, 224], [8, 3, 224, 224], [16, 3, 224, 224])}


def test_mllm_ranges_and_profiles(tmp_path):
    artifact = tokensieve.export("hf:llava-tiny", "dyvte(layers=[1], threshold=0.5)", out=tmp_path / "llava")
    ranges = symbol_ranges(artifact)
    capacity = artifact.manifest.decoder["capacity"]
    assert ranges["sequence"] == (1, 64 + 64, capacity) and ranges["past"] == (1, capacity // 2, capacity)
    assert ranges["vision_tokens"] == (65, 65, 65)  # MustDrop's vision_1: an 8 x 8 grid has no 3 x 3 windows
    first = input_profile(artifact.path / "prefill_0.onnx", ranges)
    assert first["inputs_embeds"] == ([1, 1, 64], [1, 128, 64], [1, capacity, 64])
    assert first["image_positions"] == ([0], [64], [capacity])
    assert input_profile(artifact.path / "decode.onnx", ranges) == {}  # the fixed-capacity decode graph is static
    growing = input_profile(artifact.path / "decode_growing.onnx", ranges)
    assert growing["past_key_1"][2] == [1, 2, capacity, 16]  # past_kept (after the cut) takes past's range
    assert set(graph_paths(artifact)) == {f"{k}.onnx" for k in artifact.manifest.graphs if k != "external_data"}


def test_llava_next_patches_range():
    manifest = MllmManifest(
        source={},
        graphs={},
        decoder={"capacity": 1024},
        image_tokens={"per_crop": 64},
        host={"kind": "llava_next", "image_size": 112, "grid_pinpoints": [[112, 224], [224, 224], [336, 112]]},
    )
    ranges = symbol_ranges(SimpleNamespace(kind="mllm", manifest=manifest))
    assert ranges["patches"] == (1, 5, 5) and "vision_tokens" not in ranges
    manifest.image_tokens = {"count": 576}  # LLaVA-1.5: 64 windows, all merged leaves 64 tokens
    assert symbol_ranges(SimpleNamespace(kind="mllm", manifest=manifest))["vision_tokens"] == (65, 577, 577)


def test_unknown_axis_names_the_fix(tmp_path):
    x = ir.Value(name="x", shape=ir.Shape(["frames", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Relu", [x])
    node.outputs[0].name, node.outputs[0].shape = "y", ir.Shape(["frames", 4])
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18})
    ir.save(ir.Model(graph, ir_version=10), tmp_path / "m.onnx")
    with pytest.raises(ArtifactError, match=r"symbolic axis 'frames'.*--dim frames=MIN:OPT:MAX"):
        input_profile(tmp_path / "m.onnx", {"batch": (1, 8, 32)})
    assert input_profile(tmp_path / "m.onnx", {"frames": (1, 2, 3)}) == {"x": ([1, 4], [2, 4], [3, 4])}


@pytest.mark.skipif(TRT, reason="TensorRT is installed here")
def test_without_tensorrt_every_entry_point_says_what_to_do(vit, capsys):
    assert main(["build", str(vit.path)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not (vit.path / "engines").exists()
    with pytest.raises(RuntimeBackendError, match="tokensieve build"):
        vit.runner("model", runtime="tensorrt")
    with pytest.raises(ArtifactError, match="unknown runtime"):
        vit.runner("model", runtime="tvm")
    assert main(["build", str(vit.path), "--dim", "sequence=4:2:8"]) == 2
    assert "MIN <= OPT <= MAX" in capsys.readouterr().err
    assert main(["parity", str(vit.path), "--runtime", "tensorrt"]) == 2  # only with --replay
    assert "--replay" in capsys.readouterr().err


class OnnxEngine:
    """Stand-in for TensorRTRunner on a CPU machine: runs the ONNX graph a plan is built from, and records the plan."""

    opened: ClassVar[list[str]] = []

    def __init__(self, plan):
        plan = Path(plan)
        OnnxEngine.opened.append(plan.name)
        self._graph = OrtRunner(plan.parent.parent / f"{plan.stem}.onnx")
        self.input_names = self._graph.input_names
        self.active = ["TensorRT stand-in"]

    def run(self, feeds):
        return self._graph.run(feeds)


def test_staged_dispatch_replay_and_bench_take_the_engines(zoo, hf_config_dir, tmp_path, monkeypatch, capsys):
    path, built = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "atp(threshold=1.0, layers=[2, 4])", tmp_path / "a", buckets=[40, 104, 196])
    assert artifact.parity(reference=built).ok  # golden/staged.npz
    monkeypatch.setattr("tokensieve.runtimes.tensorrt.TensorRTRunner", OnnxEngine)
    monkeypatch.setattr(OnnxEngine, "opened", [])
    pixels = np.random.default_rng(3).standard_normal((4, 3, 224, 224), dtype=np.float32)
    engines, ort = artifact.staged_runner(runtime="tensorrt").run(pixels), artifact.staged_runner().run(pixels)
    assert [r.buckets for r in engines.routes] == [r.buckets for r in ort.routes]
    assert len({tuple(r.buckets) for r in ort.routes}) > 1
    # the stand-in engines prepack their weights, the staged ONNX Runtime sessions share one unpacked copy: the
    # products sum in another order (differences of 1e-6)
    np.testing.assert_allclose(engines.outputs["pooler_output"], ort.outputs["pooler_output"], rtol=1e-5, atol=1e-5)
    report = bench_staged(artifact, pixels, blocks=1, save=False, runtime="tensorrt")
    assert report.runtime == "tensorrt" and "TensorRT engines" in report.text()
    opened = set(OnnxEngine.opened)  # every plan the dispatcher and the benchmark open is one `build` makes
    assert opened <= {f"{Path(p).stem}.plan" for p in graph_paths(artifact)}
    assert {"stage1.plan", "stage2_dynamic.plan", "stage3_dynamic.plan", "padmax.plan", "baseline.plan"} <= opened
    assert main(["bench", str(artifact.path), "--runtime", "tensorrt", "--blocks", "1"]) == 0
    assert "TensorRT engines" in capsys.readouterr().out
    with pytest.raises(ArtifactError, match="no debug outputs"):
        artifact.staged_runner(runtime="tensorrt", expose=True)
    # the recorded staged parity replays on the engines: every bucket edge and routing mode, on the outputs
    replay = artifact.replay(runtime="tensorrt")
    assert replay.ok, replay.text()
    labels = [c.label for c in replay.checks]
    assert "oracle (natural counts)" in labels and "padmax (natural counts)" in labels and len(labels) > 5
    assert all(c.same_kept is None for c in replay.checks)  # an engine has no kept-token outputs
    assert main(["parity", str(artifact.path), "--replay", "--runtime", "tensorrt"]) == 0


@pytest.mark.skipif(not TRT, reason="needs TensorRT and an NVIDIA GPU")
def test_engines_build_replay_and_bench(vit, capsys):
    assert vit.parity(batch=2).ok
    assert main(["build", str(vit.path), "--max-batch", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["engines"]) == {"model.onnx", "baseline.onnx"}
    assert (vit.path / "engines" / "model.plan").is_file() and (vit.path / "engines" / "build.json").is_file()
    replay = vit.replay(runtime="tensorrt", tolerance=1e-3)
    assert replay.ok, replay.text()
    out = vit.runner("model", runtime="tensorrt").run({"pixel_values": np.zeros((3, 3, 224, 224), np.float32)})
    assert next(iter(out.values())).shape[0] == 3
    bench = vit.bench(batches=[1, 8], runtime="tensorrt", save=False)
    assert all(row.model_ms > 0 for row in bench.rows)


@pytest.mark.skipif(not TRT, reason="needs TensorRT and an NVIDIA GPU")
def test_staged_engines_build_dispatch_and_bench(zoo, tmp_path):
    path, _ = zoo("timm:vit_small_patch16_224", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "atp(threshold=1.2)", tmp_path / "a", buckets=[64, 128, 196])
    report = artifact.build(max_batch=8)
    assert set(report["engines"]) == set(graph_paths(artifact))
    pixels = np.random.default_rng(0).standard_normal((4, 3, 224, 224), dtype=np.float32)
    engines, ort = artifact.staged_runner(runtime="tensorrt").run(pixels), artifact.staged_runner().run(pixels)
    assert [r.buckets for r in engines.routes] == [r.buckets for r in ort.routes]
    scale = np.abs(ort.outputs["logits"]).max()
    np.testing.assert_allclose(engines.outputs["logits"], ort.outputs["logits"], rtol=0, atol=1e-3 * scale)
    bench = bench_staged(artifact, pixels, blocks=2, save=False, runtime="tensorrt")
    assert all(ms > 0 for ms in bench.mean_ms.values())


class FakeEngineBuild:
    """Stand-in for Polygraphy's EngineBytesFromNetwork: records the network loader and the builder config."""

    seen: ClassVar[list] = []

    def __init__(self, network, config):
        FakeEngineBuild.seen.append((network, config))

    def __call__(self):
        return b"plan"


@pytest.mark.parametrize(("version", "int8_flag", "strongly_typed"), [((10, 3), True, False), ((11, 4), False, True)])
def test_qdq_graphs_build_with_the_int8_flag_on_tensorrt_10(tmp_path, monkeypatch, version, int8_flag, strongly_typed):
    monkeypatch.setattr("tokensieve.runtimes.tensorrt.require_tensorrt", lambda: version)
    monkeypatch.setattr("polygraphy.backend.trt.EngineBytesFromNetwork", FakeEngineBuild)
    monkeypatch.setattr(FakeEngineBuild, "seen", [])
    built = build_engine(tmp_path / "model.onnx", tmp_path / "engines" / "model.plan", {}, int8=True)
    ((network, config),) = FakeEngineBuild.seen
    assert config.int8 is int8_flag and not config.fp16  # TensorRT 11: the Q/DQ nodes type the network
    assert bool(network.strongly_typed) is strongly_typed
    assert built["int8_flag"] is int8_flag and (tmp_path / "engines" / "model.plan").read_bytes() == b"plan"
    assert not list((tmp_path / "engines").glob("*.partial"))
    if version[0] == 10:
        build_engine(tmp_path / "model.onnx", tmp_path / "fp16.plan", {}, fp16=True, int8=True)
        assert FakeEngineBuild.seen[-1][1].fp16 and FakeEngineBuild.seen[-1][1].int8  # trtexec's --best
    else:
        with pytest.raises(RuntimeBackendError, match="no precision flags"):
            build_engine(tmp_path / "model.onnx", tmp_path / "fp16.plan", {}, fp16=True)


def test_build_asks_for_int8_exactly_for_quantized_artifacts(zoo, hf_config_dir, tmp_path, monkeypatch):
    calls = []

    def record(onnx, plan, profile, fp16=False, int8=False):
        calls.append((onnx.name, int8))
        plan.write_bytes(b"plan")
        return {"bytes": 4}

    monkeypatch.setattr("tokensieve.runtimes.tensorrt.require_tensorrt", lambda: (10, 3))
    monkeypatch.setattr("tokensieve.runtimes.tensorrt.build_engine", record)
    path, _ = zoo(f"hf:{hf_config_dir('vit')}")
    fp32 = tokensieve.export(str(path), "topk(keep=0.5, layers=[2])", tmp_path / "fp32")
    data = np.random.default_rng(0).standard_normal((4, *fp32.manifest.inputs[0]["shape"][1:]), dtype=np.float32)
    int8 = fp32.quantize(data, tmp_path / "int8")
    assert not fp32.build()["int8"] and int8.build()["int8"]
    assert calls == [("model.onnx", False), ("baseline.onnx", False), ("model.onnx", True), ("baseline.onnx", True)]


class FakeEngine:
    """Stand-in for ``tensorrt.ICudaEngine``: one optimization profile per input (``get_tensor_profile_shape``)."""

    def __init__(self, profile):
        self.profile = profile

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return self.profile[name]


class FakeTrtRunner:
    """Stand-in for Polygraphy's TrtRunner, following its documented behaviour: the input metadata has the engine's
    tensor shapes (-1 for an axis the profile bounds), ``engine`` is set once active, a batch outside the profile is
    an error (as TensorRT's setInputShape), and outputs are views of host buffers reused on every call."""

    shape: ClassVar[tuple] = (-1, 3, 4, 4)
    profile: ClassVar[tuple] = ([2, 3, 4, 4], [2, 3, 4, 4], [2, 3, 4, 4])
    calls: ClassVar[list[int]] = []

    def __init__(self, loader):
        self.loader, self.engine, self.host = loader, None, None

    def activate(self):
        self.engine = FakeEngine({"pixel_values": self.profile})

    def get_input_metadata(self):
        return {"pixel_values": SimpleNamespace(shape=self.shape)}

    def infer(self, feeds):
        batch = len(feeds["pixel_values"])
        if not self.profile[0][0] <= batch <= self.profile[2][0]:
            raise RuntimeError(f"batch {batch} is outside the optimization profile")
        FakeTrtRunner.calls.append(batch)
        if self.host is None or len(self.host) < batch:
            self.host = np.empty((self.profile[2][0], 48), np.float32)
        out = self.host[:batch]  # the runner's host buffer, overwritten by the next call
        out[...] = feeds["pixel_values"].reshape(batch, -1) * 2
        return {"logits": out}


def _fake_runner(tmp_path, monkeypatch, shape, profile):
    monkeypatch.setattr("tokensieve.runtimes.tensorrt.require_tensorrt", lambda: (10, 3))
    monkeypatch.setattr("polygraphy.backend.trt.TrtRunner", FakeTrtRunner)
    monkeypatch.setattr(FakeTrtRunner, "calls", [])
    monkeypatch.setattr(FakeTrtRunner, "shape", shape)
    monkeypatch.setattr(FakeTrtRunner, "profile", profile)
    (tmp_path / "model.plan").write_bytes(b"plan")
    return TensorRTRunner(tmp_path / "model.plan")


def test_fixed_batch_engines_run_any_batch_in_chunks(tmp_path, monkeypatch):
    """Issue 27 item 3: a DLA engine's batch is fixed by its profile (min = opt = max), its tensor shape says -1."""
    runner = _fake_runner(tmp_path, monkeypatch, (-1, 3, 4, 4), ([2, 3, 4, 4],) * 3)
    assert runner.static_batch == 2 and runner.batches == (2, 2)
    pixels = np.arange(5 * 48, dtype=np.float32).reshape(5, 3, 4, 4)
    out = runner.run({"pixel_values": pixels})["logits"]
    np.testing.assert_array_equal(out, pixels.reshape(5, -1) * 2)  # 3 chunks, the last padded, 5 rows back
    assert FakeTrtRunner.calls == [2, 2, 2]


def test_chunked_outputs_are_copies_of_the_reused_host_buffers(tmp_path, monkeypatch):
    """Issue 27 item 9: Polygraphy reuses its host output buffers; every chunk must keep its own values."""
    runner = _fake_runner(tmp_path, monkeypatch, (2, 3, 4, 4), ([2, 3, 4, 4],) * 3)  # a static-batch engine
    pixels = np.random.default_rng(0).standard_normal((6, 3, 4, 4), dtype=np.float32)
    out = runner.run({"pixel_values": pixels})["logits"]
    np.testing.assert_array_equal(out, pixels.reshape(6, -1) * 2)
    single = runner.run({"pixel_values": pixels[:2]})["logits"]
    runner.run({"pixel_values": pixels[2:4]})
    np.testing.assert_array_equal(single, pixels[:2].reshape(2, -1) * 2)  # not overwritten by the next call


def test_dynamic_profile_runs_more_images_than_its_maximum_in_chunks(tmp_path, monkeypatch):
    runner = _fake_runner(tmp_path, monkeypatch, (-1, 3, 4, 4), ([1, 3, 4, 4], [4, 3, 4, 4], [4, 3, 4, 4]))
    assert runner.static_batch is None and runner.batches == (1, 4)
    pixels = np.random.default_rng(1).standard_normal((9, 3, 4, 4), dtype=np.float32)
    np.testing.assert_array_equal(runner.run({"pixel_values": pixels})["logits"], pixels.reshape(9, -1) * 2)
    assert FakeTrtRunner.calls == [4, 4, 1]


@pytest.mark.parametrize(("version", "tf32"), [((10, 3), True), ((11, 4), None)])
def test_fp32_engines_record_and_request_tf32_like_trtexec(tmp_path, monkeypatch, version, tf32):
    """Issue 27 item 10: Polygraphy's CreateConfig clears TF32 unless asked (trtexec keeps it on): ask, record it."""
    monkeypatch.setattr("tokensieve.runtimes.tensorrt.require_tensorrt", lambda: version)
    monkeypatch.setattr("polygraphy.backend.trt.EngineBytesFromNetwork", FakeEngineBuild)
    monkeypatch.setattr(FakeEngineBuild, "seen", [])
    built = build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", {})
    ((_, config),) = FakeEngineBuild.seen
    assert config.tf32 is bool(tf32) and built["tf32"] is tf32


def test_polygraphy_floor_guards_precision_is_set(tmp_path, monkeypatch):
    """Issue 27 item 8: Polygraphy before 0.50.3 reads ILayer.precision_is_set, which TensorRT 11 removed."""
    import polygraphy

    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"polygraphy>={".".join(map(str, POLYGRAPHY_FLOOR))}"' in text and POLYGRAPHY_FLOOR == (0, 50, 3)
    monkeypatch.setattr("tokensieve.runtimes.tensorrt.require_tensorrt", lambda: (11, 4))
    monkeypatch.setattr("polygraphy.backend.trt.EngineBytesFromNetwork", FakeEngineBuild)
    monkeypatch.setattr(polygraphy, "__version__", "0.49.26")
    with pytest.raises(RuntimeBackendError, match=r"pip install 'polygraphy>=0\.50\.3'"):
        build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", {})
    monkeypatch.setattr(polygraphy, "__version__", "0.50.3")
    assert build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", {})["tf32"] is None


class SilentFailure:
    def __init__(self, network, config):
        pass

    def __call__(self):
        raise RuntimeError()  # a builder failure with an empty message


def test_an_empty_error_message_still_names_the_failure(tmp_path, monkeypatch):
    monkeypatch.setattr("tokensieve.runtimes.tensorrt.require_tensorrt", lambda: (10, 3))
    monkeypatch.setattr("polygraphy.backend.trt.EngineBytesFromNetwork", SilentFailure)
    with pytest.raises(RuntimeBackendError, match=r"could not build model\.onnx: RuntimeError"):
        build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", {})


def test_polygraphy_replay_command_fits_the_golden_batch(zoo, hf_config_dir, tmp_path):
    """Issue 27 item 5: without shapes, Polygraphy's default profile sets every dynamic axis to 1; the printed
    replay must give a profile the golden inputs (batch 2) fit."""
    from polygraphy import constants
    from polygraphy.json import load_json

    path, built = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    vit = tokensieve.export(str(path), "topk(keep=0.5, layers=[2])", tmp_path / "a")
    report = vit.parity(reference=built, batch=2)
    feeds = load_json(str(vit.path / "golden" / "inputs.json"))[0]
    words = report.replay.split()
    assert words[:3] == ["polygraphy", "run", str(vit.graph_path("model"))]

    def given(which: str) -> dict[str, list[int]]:  # --trt-min-shapes name:[1,3,224,224] ...
        flag = f"--trt-{which}-shapes"
        if flag not in words:
            return {}
        name, shape = words[words.index(flag) + 1].split(":")
        return {name: json.loads(shape)}

    for value in ir.load(vit.graph_path("model")).graph.inputs:
        default = [d if isinstance(d, int) else constants.DEFAULT_SHAPE_VALUE for d in value.shape]
        low, high = given("min").get(value.name, default), given("max").get(value.name, default)
        shape = list(feeds[value.name].shape)
        assert shape[0] == 2 and all(a <= d <= b for a, d, b in zip(low, shape, high, strict=True)), (low, high)


def test_evicting_methods_profile_takes_the_whole_prompt(tmp_path):
    """Issue 27 item 4: H2O prefills the whole prompt (image tokens + text) before evicting down to its budget, so
    the prefill profile must reach the prompt, not the 41-slot capacity."""
    artifact = tokensieve.export("hf:llava-tiny", "h2o(budget=40, recent=8)", out=tmp_path / "h2o")
    capacity = artifact.manifest.decoder["capacity"]
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    prompt = " ".join(["describe the picture and every object in it"] * 8)
    length = len(artifact.generate(image, prompt, 2).prompt_ids)
    assert length > capacity  # the runtime takes it: an evicting cache has no prompt limit
    ranges = symbol_ranges(artifact)
    assert ranges["sequence"][2] >= length
    prefill = input_profile(artifact.path / artifact.manifest.graphs["prefill"], ranges)
    assert prefill["inputs_embeds"][2][1] >= length
