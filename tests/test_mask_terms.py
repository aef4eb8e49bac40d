"""Attention-mask terms that cannot change a softmax are removed before locating (graph_passes/drop_zero_masks.py):
a summand of the logit bias that is constant along the key axis goes, one that varies along it stays."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from tokensieve.graph_passes.drop_zero_masks import DropZeroMaskPass

N = 5


def _model(row: np.ndarray) -> ir.Model:
    """``Softmax(q @ k^T + (bias + Cast(Expand(row, [Shape(q)[0], 1, N, N]))))``: the bias is a constant, ``row``
    a constant boolean expanded to the batch (as transformers 5 adds its mask)."""
    f = onnx.TensorProto.FLOAT
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["logits"]),
        helper.make_node("Shape", ["q"], ["batch"], start=0, end=1),
        helper.make_node("Concat", ["batch", "tail"], ["target"], axis=0),
        helper.make_node("Expand", ["row", "target"], ["wide"]),
        helper.make_node("Cast", ["wide"], ["ones"], to=f),
        helper.make_node("Add", ["bias", "ones"], ["term"]),
        helper.make_node("Add", ["logits", "term"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, N, N], np.int64), "tail"),
        numpy_helper.from_array(row, "row"),
        numpy_helper.from_array(rng.standard_normal((1, 2, N, N)).astype(np.float32), "bias"),
    ]
    io = [helper.make_tensor_value_info(name, f, ["b", 2, N, 4]) for name in ("q", "k")]
    out = [helper.make_tensor_value_info("probs", f, ["b", 2, N, N])]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", io, out, inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    shapes = {"wide": [1], "ones": [1], "term": [2], "masked": [2], "logits": [2]}
    for node in model.graph:  # annotated as the exporter annotates them
        for value in node.outputs:
            if value.name in shapes:
                value.shape = ir.Shape([ir.SymbolicDim("b"), *shapes[value.name], N, N])
    return model


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    return session.run(None, feeds)[0]


@pytest.mark.parametrize(
    ("row", "dropped"),
    [
        (np.ones((1, 1, N, 1), bool), True),  # the all-true mask: +1 on every logit
        (np.arange(N).reshape(1, 1, N, 1) % 2 == 0, True),  # constant per query row
        (np.arange(N).reshape(1, 1, 1, N) % 2 == 0, False),  # varies along the keys: it changes the softmax
    ],
)
def test_key_constant_summand(row, dropped):
    rng = np.random.default_rng(1)
    feeds = {name: rng.standard_normal((3, 2, N, 4)).astype(np.float32) for name in ("q", "k")}
    model = _model(row)
    before = _run(model, feeds)
    DropZeroMaskPass()(model)
    assert any(n.op_type == "Expand" for n in model.graph) != dropped
    np.testing.assert_allclose(_run(model, feeds), before, rtol=1e-5, atol=1e-6)
