"""One copy of an artifact's weights across its ONNX Runtime sessions (``tokensieve.runtimes.ort.SharedWeights``)."""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
import pytest

from tokensieve.artifact.store import save_shared
from tokensieve.errors import ArtifactError
from tokensieve.runtimes.ort import OrtRunner, SharedWeights

ROWS, COLUMNS = 1024, 4096  # a 16 MiB weight, far above what the runtime allocates for itself


def _graph(weight: np.ndarray, scale: float) -> ir.Model:
    """``y = (x @ W) * scale``: the same weight in every graph, as prefill and decode share the decoder layers."""
    x = ir.Value(name="x", shape=ir.Shape([2, ROWS]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(weight, name="w"))
    s = ir.Value(name="s", const_value=ir.tensor(np.float32(scale), name="s"))
    product = ir.node("MatMul", [x, w])
    y = ir.node("Mul", [product.outputs[0], s])
    y.outputs[0].name = "y"
    graph = ir.Graph([x], y.outputs, nodes=[product, y], initializers=[w, s], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _anonymous_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shared")
    weight = np.random.default_rng(0).standard_normal((ROWS, COLUMNS)).astype(np.float32)
    graphs = {f"g{i}": _graph(weight, float(i + 1)) for i in range(4)}
    save_shared(graphs, directory, {key: f"{key}.onnx" for key in graphs})
    return directory, weight


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc")
def test_sessions_read_one_mapped_copy(artifact):
    directory, weight = artifact
    x = np.random.default_rng(1).standard_normal((2, ROWS)).astype(np.float32)
    own = [OrtRunner(directory / f"g{i}.onnx") for i in range(4)]
    before = _anonymous_mib()
    weights = SharedWeights(directory / "weights.data")
    shared = [OrtRunner(directory / f"g{i}.onnx", weights=weights) for i in range(4)]
    outputs = [runner.run({"x": x})["y"] for runner in shared]
    grown = _anonymous_mib() - before
    for i, (ours, theirs) in enumerate(zip(outputs, own, strict=True)):
        np.testing.assert_allclose(ours, theirs.run({"x": x})["y"], rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(ours, (x @ weight) * (i + 1), rtol=1e-4, atol=1e-3)
    assert grown < weight.nbytes / 2**20 / 2, f"4 sessions grew the private memory by {grown:.0f} MiB"
    assert len(weights._values) == 1  # one view of the weight, handed to every session


def test_missing_weights_file_is_a_typed_error(tmp_path):
    with pytest.raises(ArtifactError, match="re-export"):
        SharedWeights(tmp_path / "weights.data")
