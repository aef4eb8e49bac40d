"""Triton model repositories (`tokensieve triton`): configs parsed with Triton's own ModelConfig proto, every BLS call
of the bucket router checked against the called model's config and run on ONNX Runtime, and the router's answers
compared with tokensieve's dispatcher on the artifact."""

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import tokensieve
from tokensieve.api import Artifact
from tokensieve.cli import main
from tokensieve.errors import ArtifactError
from tokensieve.manifest import MllmManifest
from tokensieve.runtimes.buckets import StagedRunner
from tokensieve.runtimes.ort import OrtRunner

_tritonclient = importlib.util.find_spec("tritonclient")
if _tritonclient is None:
    pytest.skip("tritonclient (the test oracle for configs) is not installed", allow_module_level=True)
_spec = importlib.util.spec_from_file_location(
    "triton_model_config_pb2", Path(_tritonclient.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
)
model_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model_config)  # the proto module alone: the grpc client package needs grpcio

from google.protobuf import json_format, text_format  # noqa: E402

_NUMPY = {
    "TYPE_FP32": np.float32,
    "TYPE_INT64": np.int64,
    "TYPE_INT32": np.int32,
    "TYPE_UINT8": np.uint8,
    "TYPE_BOOL": np.bool_,
    "TYPE_STRING": np.object_,
}


def load_config(folder: Path):
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config.ModelConfig())
    assert config.name == folder.name
    return config


def check_tensors(config, tensors: dict[str, np.ndarray], section: str, wire: bool = False) -> None:
    """What Triton enforces: the config's names (optional inputs may be absent), types and dims (batch axis up to
    max_batch_size). Triton's reshape rule: the model sees a tensor in its ``reshape`` shape, its callers (``wire``:
    a client or a BLS request) in its ``dims`` shape."""
    declared = {t.name: t for t in getattr(config, section)}
    required = {name for name, t in declared.items() if not (section == "input" and t.optional)}
    assert required <= set(tensors) <= set(declared), (config.name, section, set(tensors), set(declared))
    for name, value in tensors.items():
        spec = declared[name]
        assert value.dtype == _NUMPY[model_config.DataType.Name(spec.data_type)], (config.name, name, value.dtype)
        dims = list(spec.reshape.shape) if spec.HasField("reshape") and not wire else list(spec.dims)
        shape = list(value.shape)
        if config.max_batch_size:
            assert 1 <= shape[0] <= config.max_batch_size, (config.name, name, shape)
            shape = shape[1:]
        assert len(shape) == len(dims) and all(d in (-1, s) for d, s in zip(dims, shape, strict=True)), (
            config.name,
            name,
            shape,
            dims,
        )


def reshaped(config, tensors: dict[str, np.ndarray], section: str, to_model: bool) -> dict[str, np.ndarray]:
    """Triton's reshape rule between the caller's ``dims`` and the model's ``reshape`` shape (batch axis kept)."""
    declared = {t.name: t for t in getattr(config, section)}
    out = {}
    for name, value in tensors.items():
        spec = declared[name]
        if spec.HasField("reshape"):
            shape = list(spec.reshape.shape) if to_model else list(spec.dims)
            value = value.reshape(([len(value)] if config.max_batch_size else []) + shape)
        out[name] = value
    return out


def onnx_file(version: Path) -> Path:
    """The ONNX Runtime backend's model file: ``model.onnx``, or for a multi-file model (external data) the
    directory ``model.onnx/`` holding ``model.onnx``; a single file is read from memory, so its external data could
    not be found."""
    import onnx

    path = version / "model.onnx"
    if path.is_dir():
        return path / "model.onnx"
    model = onnx.load(path, load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert not external, f"{path}: a model with external data must be the directory model.onnx/"
    return path


class FakeTriton:
    """Triton's ``triton_python_backend_utils`` and server, as far as the router uses them: BLS requests are checked
    against the called model's config.pbtxt (Triton's reshape rule applied both ways) and run with ONNX Runtime on
    its ONNX file; a ``tensorrt_plan`` model runs the ONNX graph its plan was built from (``graphs``: model name ->
    ONNX path) and, like Triton's TensorRT backend, refuses a config whose batch the engine's profile (``profiles``:
    model name -> (min, max) batch) does not cover, and answers in GPU memory unless the request prefers CPU."""

    def __init__(self, repository: Path, graphs: dict | None = None, profiles: dict | None = None):
        self.repository, self.sessions, self.calls = repository, {}, []
        self.graphs, self.profiles = graphs or {}, profiles or {}
        self.module = types.ModuleType("triton_python_backend_utils")
        fake = self

        class TritonModelException(Exception):
            pass

        class Tensor:
            def __init__(self, name, value, gpu=False):
                self._name, self._value, self._gpu = name, value, gpu

            def name(self):
                return self._name

            def is_cpu(self):
                return not self._gpu

            def as_numpy(self):
                if self._gpu:  # python_backend: as_numpy() reads CPU tensors only
                    raise TritonModelException("tensor is stored in GPU memory; use from_dlpack or ask for CPU")
                return self._value

        class PreferredMemory:
            def __init__(self, memory_type, device_id=0):
                self.memory_type, self.device_id = memory_type, device_id

        class TritonError:
            def __init__(self, message):
                self._message = message

            def message(self):
                return self._message

        class InferenceResponse:
            def __init__(self, output_tensors, error=None):
                self.output_tensors, self._error = output_tensors, error

            def has_error(self):
                return self._error is not None

            def error(self):
                return self._error

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
                self.model_name, self.requested, self.inputs = model_name, requested_output_names, inputs
                self.preferred_memory = preferred_memory

            def exec(self):
                feeds = {t.name(): t.as_numpy() for t in self.inputs}
                return fake.infer(self.model_name, feeds, self.requested, self.preferred_memory)

        def by_name(holder, name):
            tensors = holder.output_tensors if isinstance(holder, InferenceResponse) else holder.inputs
            return next((t for t in tensors if t.name() == name), None)

        for item in (Tensor, TritonError, InferenceResponse, InferenceRequest, PreferredMemory, TritonModelException):
            setattr(self.module, item.__name__, item)
        self.module.TRITONSERVER_MEMORY_GPU, self.module.TRITONSERVER_MEMORY_CPU = 2, 0
        self.module.get_input_tensor_by_name = by_name
        self.module.get_output_tensor_by_name = by_name

    def load(self, model: str, config) -> OrtRunner:
        folder = self.repository / model
        if config.platform == "onnxruntime_onnx":
            return OrtRunner(onnx_file(folder / "1"))
        assert config.platform == "tensorrt_plan" and (folder / "1" / "model.plan").is_file()
        low, high = self.profiles.get(model, (1, config.max_batch_size))
        if config.max_batch_size:  # the TensorRT backend checks the config against the engine's profile
            assert low <= 1 and config.max_batch_size <= high, (model, config.max_batch_size, (low, high))
        else:
            assert all(low <= t.dims[0] <= high for t in config.input), (model, [list(t.dims) for t in config.input])
        return OrtRunner(self.graphs[model])

    def infer(self, model: str, feeds: dict[str, np.ndarray], requested: list[str], preferred=None):
        config = load_config(self.repository / model)
        check_tensors(config, feeds, "input", wire=True)
        if model not in self.sessions:
            self.sessions[model] = self.load(model, config)
        outputs = self.sessions[model].run(reshaped(config, feeds, "input", to_model=True), requested)
        check_tensors(config, outputs, "output")
        outputs = reshaped(config, outputs, "output", to_model=False)
        check_tensors(config, outputs, "output", wire=True)
        self.calls.append((model, len(next(iter(feeds.values())))))
        cpu = preferred is not None and preferred.memory_type == self.module.TRITONSERVER_MEMORY_CPU
        gpu = config.platform == "tensorrt_plan" and not cpu  # TensorRT outputs stay where the engine wrote them
        return self.module.InferenceResponse([self.module.Tensor(k, v, gpu) for k, v in outputs.items()])

    def python_model(self, name: str):
        """Load a Python-backend model's ``model.py`` as the backend would, and initialize it."""
        folder = self.repository / name
        sys.modules["triton_python_backend_utils"] = self.module
        try:
            spec = importlib.util.spec_from_file_location(f"router_{name}", folder / "1" / "model.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            del sys.modules["triton_python_backend_utils"]
        model = module.TritonPythonModel()
        config = json_format.MessageToJson(load_config(folder), preserving_proto_field_name=True)
        model.initialize(
            {"model_repository": str(folder), "model_version": "1", "model_name": name, "model_config": config}
        )
        return model

    def requests(self, model, name: str, *feeds: np.ndarray | dict[str, np.ndarray]) -> list:
        """Hand a Python-backend model one request per feed (a dict of inputs, or the first input's array) in a
        single ``execute`` call (what dynamic batching does)."""
        config = load_config(self.repository / name)
        requests = []
        for feed in feeds:
            feed = feed if isinstance(feed, dict) else {config.input[0].name: feed}
            check_tensors(config, feed, "input")
            requests.append(self.module.InferenceRequest(name, [], [self.module.Tensor(k, v) for k, v in feed.items()]))
        responses = model.execute(requests)
        assert len(responses) == len(requests)
        for response in responses:
            if not response.has_error():
                check_tensors(config, {t.name(): t.as_numpy() for t in response.output_tensors}, "output")
        return responses


@pytest.fixture(scope="module")
def staged(zoo, hf_config_dir, tmp_path_factory):
    """A two-site staged HF ViT (token-level output) and its repository."""
    path, _ = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    root = tmp_path_factory.mktemp("triton")
    artifact = tokensieve.export(
        str(path), "atp(threshold=1.0, layers=[2, 4])", root / "vit_atp", buckets=[40, 104, 196]
    )
    models = artifact.triton(root / "repo", max_batch=4)
    return artifact, root / "repo", models


def test_router_answers_like_the_dispatcher(staged):
    artifact, repo, models = staged
    assert models[0] == "vit_atp" and len(models) == 1 + len(artifact.manifest.stages["graphs"]) + 1
    for name in models:
        config = load_config(repo / name)
        assert config.max_batch_size == 4 and config.HasField("dynamic_batching")
        assert config.backend == "python" if name == "vit_atp" else (repo / name / "1" / "model.onnx").is_dir()
    server = FakeTriton(repo)
    router = server.python_model("vit_atp")
    pixels = np.random.default_rng(3).standard_normal((4, 3, 224, 224), dtype=np.float32)
    (response,) = server.requests(router, "vit_atp", pixels)
    assert not response.has_error(), response.error().message()
    got = {t.name(): t.as_numpy() for t in response.output_tensors}
    expected = StagedRunner(artifact.path, artifact.manifest.stages).run(pixels)
    assert got["buckets"].tolist() == [r.buckets for r in expected.routes]
    assert got["kept_tokens"].tolist() == [r.counts for r in expected.routes]  # no truncation: counts fit
    assert len({tuple(r.buckets) for r in expected.routes}) > 1  # the batch really was split between buckets
    assert got["last_hidden_state"].shape == (4, 1 + 196, 192)  # padded to the largest last bucket
    for i, valid in enumerate(expected.outputs["last_hidden_state"]):
        np.testing.assert_allclose(got["last_hidden_state"][i, : len(valid)], valid, rtol=0, atol=1e-5)
        assert not got["last_hidden_state"][i, len(valid) :].any()
    np.testing.assert_allclose(got["pooler_output"], expected.outputs["pooler_output"], rtol=0, atol=1e-5)
    stage1 = [n for n, b in server.calls if n == "vit_atp_stage1"]
    assert stage1 == ["vit_atp_stage1"] and sum(b for n, b in server.calls if n.startswith("vit_atp_stage3")) == 4


def test_requests_batched_together_are_dispatched_as_one_batch(staged):
    artifact, repo, _ = staged
    server = FakeTriton(repo)
    router = server.python_model("vit_atp")
    pixels = np.random.default_rng(4).standard_normal((5, 3, 224, 224), dtype=np.float32)
    responses = server.requests(router, "vit_atp", pixels[:2], pixels[2:3], pixels[3:])
    # 5 images, max_batch_size 4: stage 1 runs twice (4 + 1), not once per request
    assert [b for n, b in server.calls if n == "vit_atp_stage1"] == [4, 1]
    expected = [*StagedRunner(artifact.path, artifact.manifest.stages).run(pixels[:4]).routes]
    expected += StagedRunner(artifact.path, artifact.manifest.stages).run(pixels[4:]).routes
    got = [{t.name(): t.as_numpy() for t in r.output_tensors} for r in responses]
    assert [len(g["buckets"]) for g in got] == [2, 1, 2]
    assert np.concatenate([g["buckets"] for g in got]).tolist() == [r.buckets for r in expected]
    alone = {t.name(): t.as_numpy() for t in server.requests(router, "vit_atp", pixels[2:3])[0].output_tensors}
    np.testing.assert_allclose(got[1]["pooler_output"], alone["pooler_output"], rtol=0, atol=1e-5)


def _imports_with(model_py: Path, *blocked: str) -> bool:
    """``model.py`` imports in a fresh interpreter where the ``blocked`` packages cannot be imported."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in blocked)
    code = (
        f"import sys, types; {block}; sys.modules['triton_python_backend_utils'] = types.ModuleType('pb'); "
        f"import runpy; runpy.run_path({str(model_py)!r}); print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    return True


def test_router_imports_without_torch_or_onnx(staged):
    _, repo, _ = staged
    assert _imports_with(repo / "vit_atp" / "1" / "model.py", "torch", "onnx", "onnx_ir", "onnxruntime", "timm")


def test_overflow_is_an_error_response(zoo, hf_config_dir, tmp_path):
    path, _ = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "atp(threshold=0.5, grid=0)", tmp_path / "a", buckets=[16, 32])
    artifact.triton(tmp_path / "repo", name="small")
    server = FakeTriton(tmp_path / "repo")
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    responses = server.requests(server.python_model("small"), "small", pixels, pixels[:1])
    assert all(r.has_error() and "largest bucket holds 32" in r.error().message() for r in responses)


def test_single_graph_repository_and_replacement(zoo, hf_config_dir, tmp_path, capsys):
    path, _ = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "topk(keep=0.5, layers=[2])", tmp_path / "a")
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    assert main(["triton", str(tmp_path / "a"), "--out", str(repo), "--name", "vit", "--kind", "cpu"]) == 0
    assert "clients call 'vit'" in capsys.readouterr().out
    config = load_config(repo / "vit")
    assert config.platform == "onnxruntime_onnx" and config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    pixels = np.random.default_rng(1).standard_normal((3, 3, 224, 224), dtype=np.float32)
    assert (repo / "vit" / "1" / "model.onnx" / "model.onnx").is_file()  # multi-file model: a directory
    served = FakeTriton(repo).infer("vit", {"pixel_values": pixels}, ["last_hidden_state", "pooler_output"])
    direct = artifact.run(pixels)
    for tensor in served.output_tensors:
        np.testing.assert_array_equal(tensor.as_numpy(), direct[tensor.name()])
    # a second bundle replaces tokensieve's own folder and leaves the others alone
    assert main(["triton", str(tmp_path / "a"), "--out", str(repo), "--name", "vit", "--max-batch", "2"]) == 0
    assert load_config(repo / "vit").max_batch_size == 2 and (repo / "other" / "config.pbtxt").is_file()
    assert sorted(p.name for p in repo.iterdir()) == ["other", "vit"]  # no staging folder left behind
    # a folder tokensieve did not write is never replaced
    assert main(["triton", str(tmp_path / "a"), "--out", str(repo), "--name", "other"]) == 2
    assert (
        "did not write" in capsys.readouterr().err
        and (repo / "other" / "config.pbtxt").read_text() == 'name: "other"\n'
    )


def test_tensorrt_backend_uses_the_built_engines(zoo, hf_config_dir, tmp_path):
    path, _ = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "topk(keep=0.5, layers=[2])", tmp_path / "a")
    with pytest.raises(ArtifactError, match="no TensorRT engines; run `tokensieve build"):
        artifact.triton(tmp_path / "repo", backend="tensorrt")
    engines = tmp_path / "a" / "engines"  # what `tokensieve build --max-batch 16` leaves (plans are opaque here)
    engines.mkdir()
    (engines / "model.plan").write_bytes(b"plan")
    (engines / "build.json").write_text(json.dumps({"ranges": {"batch": [1, 8, 16]}}))
    artifact.triton(tmp_path / "repo", backend="tensorrt", name="vit_trt")
    config = load_config(tmp_path / "repo" / "vit_trt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    assert (tmp_path / "repo" / "vit_trt" / "1" / "model.plan").read_bytes() == b"plan"
    with pytest.raises(ArtifactError, match="exceeds the engines' profile maximum 16"):
        artifact.triton(tmp_path / "repo", backend="tensorrt", max_batch=32)


def test_mllm_generation_model(tmp_path):
    artifact = tokensieve.export("hf:llava-tiny", "fastv(k=1, keep=0.5)", out=tmp_path / "llava")
    assert artifact.triton(tmp_path / "repo") == ["llava"]
    config = load_config(tmp_path / "repo" / "llava")
    assert config.backend == "python" and config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [t.name for t in config.input if t.optional] == ["image", "max_new_tokens"]
    assert (tmp_path / "repo" / "llava" / "1" / "artifact" / "manifest.json").is_file()
    server = FakeTriton(tmp_path / "repo")
    model = server.python_model("llava")
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    prompt = np.array([b"What is in the picture?"], dtype=np.object_)
    responses = server.requests(
        model,
        "llava",
        {"prompt": prompt, "image": image, "max_new_tokens": np.array([12], np.int32)},
        {"prompt": prompt},  # text only, default max_new_tokens (32)
        {"prompt": prompt, "image": image, "max_new_tokens": np.array([5000], np.int32)},  # beyond the capacity
    )
    got = [{t.name(): t.as_numpy() for t in r.output_tensors} for r in responses[:2]]
    expected = [
        artifact.generate(image, "What is in the picture?", 12),
        artifact.generate(None, "What is in the picture?"),
    ]
    for g, e in zip(got, expected, strict=True):
        assert g["ids"].tolist() == e.ids and g["text"][0].decode() == e.text
    assert responses[2].has_error() and "capacity" in responses[2].error().message()
    with pytest.raises(ArtifactError, match="--backend onnxruntime"):
        artifact.triton(tmp_path / "repo", backend="tensorrt")
    assert _imports_with(tmp_path / "repo" / "llava" / "1" / "model.py", "torch", "transformers", "timm")


def test_bad_requests(tmp_path):
    mllm = Artifact(tmp_path / "artifact", MllmManifest(source={}, graphs={}))
    with pytest.raises(ArtifactError, match="not a usable Triton model name"):
        mllm.triton(tmp_path / "repo", name="a/b")
    with pytest.raises(ArtifactError, match="unknown backend"):
        mllm.triton(tmp_path / "repo", backend="tflite")
    with pytest.raises(ArtifactError, match="unknown instance kind"):
        mllm.triton(tmp_path / "repo", kind="tpu")
    assert not (tmp_path / "repo").exists()


def _engines(artifact, repo: Path) -> dict[str, Path]:
    """Stage model name -> the ONNX graph its plan stands for (from the router's routing.json)."""
    routing = json.loads((repo / artifact.path.name / "1" / "routing.json").read_text())
    return {entry["model"]: artifact.path / relative for relative, entry in routing["models"].items()}


def _answers_like_the_dispatcher(server: FakeTriton, name: str, artifact, seed: int) -> None:
    """Three images through the router ``name`` give the dispatcher's pooled output."""
    pixels = np.random.default_rng(seed).standard_normal((3, 3, 224, 224), dtype=np.float32)
    (response,) = server.requests(server.python_model(name), name, pixels)
    assert not response.has_error(), response.error().message()
    got = {t.name(): t.as_numpy() for t in response.output_tensors}
    expected = StagedRunner(artifact.path, artifact.manifest.stages).run(pixels)
    np.testing.assert_allclose(got["pooler_output"], expected.outputs["pooler_output"], rtol=0, atol=1e-5)


def test_router_on_tensorrt_stages_asks_for_cpu_outputs(staged, tmp_path):
    """Issue 27 item 7: a TensorRT stage answers in GPU memory unless the BLS request prefers CPU."""
    artifact, _, _ = staged
    engines = artifact.path / "engines"  # what `tokensieve build --max-batch 4` leaves (plans are opaque here)
    engines.mkdir(exist_ok=True)
    for relative, _ in artifact.graph_files():
        (engines / f"{Path(relative).stem}.plan").write_bytes(b"plan")
    (engines / "build.json").write_text(json.dumps({"ranges": {"batch": [1, 4, 4]}, "engines": {}}))
    try:
        artifact.triton(tmp_path / "repo", backend="tensorrt")
        server = FakeTriton(tmp_path / "repo", graphs=_engines(artifact, tmp_path / "repo"))
        _answers_like_the_dispatcher(server, "vit_atp", artifact, seed=5)
    finally:
        for path in engines.iterdir():
            path.unlink()
        engines.rmdir()


def test_router_turns_any_failure_into_error_responses(staged, monkeypatch):
    """A stage failing with an untyped (even empty) exception answers every request with an error, not a crash."""
    _, repo, _ = staged
    server = FakeTriton(repo)
    router = server.python_model("vit_atp")

    def broken(*args, **kwargs):
        raise ValueError()

    monkeypatch.setattr(server, "infer", broken)
    pixels = np.random.default_rng(6).standard_normal((2, 3, 224, 224), dtype=np.float32)
    responses = server.requests(router, "vit_atp", pixels[:1], pixels[1:])
    assert all(r.has_error() and "ValueError" in r.error().message() for r in responses)


def test_triton_after_jetson_on_the_same_artifact(zoo, hf_config_dir, tmp_path):
    """Issue 27 item 2: a bundle must not hard-link weights.data (onnx_ir refuses external data with nlink > 1)."""
    path, _ = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "topk(keep=0.5, layers=[2])", tmp_path / "a")
    artifact.jetson(tmp_path / "bundle")
    assert (artifact.path / "weights.data").stat().st_nlink == 1
    assert artifact.triton(tmp_path / "repo") == ["a"]
    copy = tokensieve.load(tmp_path / "bundle")
    assert copy.triton(tmp_path / "repo2") == ["bundle"]


def test_dla_engines_serve_at_their_batch(zoo, hf_config_dir, tmp_path):
    """Issue 27 item 6: a DLA engine takes its fixed batch (max_batch_size 0, that batch in the dims) on its DLA
    core (secondary_devices KIND_NVDLA); the router feeds it in chunks of that batch."""
    import subprocess

    from test_jetson import _tools

    path, _ = zoo(f"hf:{hf_config_dir('vit')}", dynamic_batch=True)
    artifact = tokensieve.export(str(path), "atp(threshold=1.0, layers=[2])", tmp_path / "a", buckets=[40, 104, 196])
    info = artifact.jetson(tmp_path / "vit_dla", fp16=True, dla=1, dla_batch=1)
    env, _ = _tools(tmp_path)
    result = subprocess.run(["bash", "jetson/build_engines.sh"], cwd=tmp_path / "vit_dla", env=env, capture_output=True)
    assert result.returncode == 0, result.stderr
    bundle = tokensieve.load(tmp_path / "vit_dla")
    bundle.triton(tmp_path / "repo", backend="tensorrt")
    repo, on_dla = tmp_path / "repo", {Path(g).stem for g in info["dla"]["graphs"]}
    profiles = {}
    for model in _engines(bundle, repo):
        config = load_config(repo / model)
        group = config.instance_group[0]
        if model.removeprefix("vit_dla_") in on_dla:
            assert config.max_batch_size == 0 and all(t.dims[0] == 1 for t in config.input), model
            assert [(d.kind, d.device_id) for d in group.secondary_devices] == [(group.SecondaryDevice.KIND_NVDLA, 1)]
            profiles[model] = (1, 1)
        else:
            assert config.max_batch_size == 8 and not group.secondary_devices
    server = FakeTriton(repo, graphs=_engines(bundle, repo), profiles=profiles)
    _answers_like_the_dispatcher(server, "vit_dla", artifact, seed=7)
    assert {b for n, b in server.calls if n.removeprefix("vit_dla_") in on_dla} == {1}
