"""Shape propagation and Reshape retargeting (graph_passes/propagate.py)."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tokensieve.errors import GraphRewriteError
from tokensieve.graph_passes.propagate import propagate_shapes, retarget_dims


@pytest.mark.parametrize(
    ("old_in", "new_in", "old_out", "expected"),
    [
        ((1, 197, 1152), (1, 139, 1152), (1, 197, 3, 6, 64), (1, 139, 3, 6, 64)),
        ((1, 6, 197, 64), (1, 6, 139, 64), (6, 197, 64), (6, 139, 64)),  # heads merged into batch
        ((6, 64, 197), (6, 64, 139), (1, 6, 64, 197), (1, 6, 64, 139)),
        ((2, 197, 384), (2, 139, 384), (394, 384), (278, 384)),  # batch and tokens flattened together
        ((1, 198, 6, 64), (1, 99, 6, 64), (1, 198, 384), (1, 99, 384)),  # 198 = 2 x 99: no accidental match
        ((1, 64, 64), (1, 32, 64), (1, 64, 4, 16), (1, 32, 4, 16)),  # token count equals hidden size
    ],
)
def test_retarget_dims(old_in, new_in, old_out, expected):
    assert retarget_dims(old_in, new_in, old_out) == expected


def test_retarget_refuses_to_split_the_token_axis():
    with pytest.raises(GraphRewriteError, match="splits the changed axis"):
        retarget_dims((1, 196, 384), (1, 98, 384), (1, 14, 14, 384))


def _model_with_shared_reshape_target():
    """x[1,8,4] -> Slice tokens 0:5 (a token-count change) -> Reshape([1,8,2,2]) shared with an unchanged branch."""
    target = numpy_helper.from_array(np.array([1, 8, 2, 2], dtype=np.int64), "target")
    nodes = [
        helper.make_node("Reshape", ["x", "target"], ["a"]),  # unchanged use of the shared constant
        helper.make_node("Identity", ["x"], ["stream"]),
        helper.make_node("Reshape", ["stream", "target"], ["b"]),  # downstream use after the edit
        helper.make_node("ReduceSum", ["a"], ["sa"], keepdims=0),
        helper.make_node("ReduceSum", ["b"], ["sb"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4])],
        [
            helper.make_tensor_value_info("sa", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("sb", TensorProto.FLOAT, []),
        ],
        initializer=[target],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_downstream_constant_is_cloned_not_mutated():
    model = _model_with_shared_reshape_target()
    propagate_shapes(model)
    nodes = {n.outputs[0].name: n for n in model.graph}
    # simulate a pass that keeps 5 of the 8 tokens
    start, end, axes = (
        ir.Value(name=n, const_value=ir.tensor(np.array([v], dtype=np.int64)))
        for n, v in (("s", 0), ("e", 5), ("ax", 1))
    )
    for v in (start, end, axes):
        model.graph.register_initializer(v)
    cut = ir.Node("", "Slice", [nodes["stream"].inputs[0], start, end, axes], name="cut")
    model.graph.insert_after(nodes["stream"], cut)
    nodes["b"].replace_input_with(0, cut.outputs[0])
    model.graph.remove(nodes["stream"], safe=True)
    rewritten = propagate_shapes(model, {cut.outputs[0]: ir.Shape([1, 8, 4])})
    assert rewritten == 1
    assert model.graph.initializers["target"].const_value.numpy().tolist() == [1, 8, 2, 2]
    assert list(nodes["b"].inputs[1].const_value.numpy()) == [1, 5, 2, 2]
    assert list(nodes["b"].outputs[0].shape) == [1, 5, 2, 2]
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    x = np.arange(32, dtype=np.float32).reshape(1, 8, 4)
    sa, sb = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    assert sa == x.sum() and sb == x[:, :5].sum()


def test_legacy_shape_computations_are_evaluated():
    """Shape -> Gather -> Concat -> Reshape chains get concrete values (no symbolic unk__ dims)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["bu"]),
        helper.make_node("Concat", ["bu", "rest"], ["t"], axis=0),
        helper.make_node("Reshape", ["x", "t"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, dtype=np.int64), "i0"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "ax0"),
        numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "rest"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))
    propagate_shapes(model)
    assert list(model.graph.outputs[0].shape) == [2, 6, 4]


def test_symbolic_dims_keep_their_names_through_arithmetic():
    """A growing KV cache: Concat of [1, 2, past, 4] and [1, 2, 1, 4] is [1, 2, past+1, 4], not a proxy number;
    products of symbols stay symbolic too, and a later symbol plus one is that symbol plus one (the stream after a
    symbolic-K selection, ``slots+1``), not a multiple of an earlier one that happens to land nearby."""
    past = helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, 2, "past", 4])
    new = helper.make_tensor_value_info("new", TensorProto.FLOAT, [1, 2, 1, 4])
    grid = helper.make_tensor_value_info("grid", TensorProto.FLOAT, ["batch", "past", 3])
    kept = helper.make_tensor_value_info("kept", TensorProto.FLOAT, ["batch", "slots", 4])
    cls = helper.make_tensor_value_info("cls", TensorProto.FLOAT, ["batch", 1, 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    flat = helper.make_tensor_value_info("flat", TensorProto.FLOAT, None)
    stream = helper.make_tensor_value_info("stream", TensorProto.FLOAT, None)
    shape = numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")
    nodes = [
        helper.make_node("Concat", ["past", "new"], ["out"], axis=2),
        helper.make_node("Reshape", ["grid", "shape"], ["flat"]),
        helper.make_node("Concat", ["cls", "kept"], ["stream"], axis=1),
    ]
    graph = helper.make_graph(nodes, "g", [past, new, grid, kept, cls], [out, flat, stream], initializer=[shape])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    propagate_shapes(model)
    dims = {v.name: [d if isinstance(d, int) else d.value for d in v.shape] for v in model.graph.outputs}
    assert dims == {"out": [1, 2, "past+1", 4], "flat": ["past*batch", 3], "stream": ["batch", "slots+1", 4]}
