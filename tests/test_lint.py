"""TensorRT lint rules on small synthetic graphs (each rule must fire, and clean graphs must pass)."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from tokensieve.errors import TokensieveError
from tokensieve.graph_passes.lint import lint
from tokensieve.graph_passes.propagate import propagate_shapes


def _model(nodes, inputs, outputs, inits=(), opset=18, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))
    propagate_shapes(model)
    return model


def _x(shape=(1, 8)):
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def _out(name="y", shape=None, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _k(value):
    return numpy_helper.from_array(np.array([value], dtype=np.int64), "k")


def _rules(report):
    return {f.rule for f in report.errors}


def test_clean_topk_graph_passes():
    model = _model(
        [helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=-1)],
        [_x()],
        [_out(), _out("i", dtype=TensorProto.INT64)],
        [_k(3)],
    )
    report = lint(model, "trt10.3")
    assert report.ok and not report.findings


def test_topk_k_too_large():
    model = _model(
        [helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=-1)],
        [_x((1, 5000))],
        [_out(), _out("i", dtype=TensorProto.INT64)],
        [_k(3840)],
    )
    assert _rules(lint(model)) == {"topk-k"}


def test_topk_k_from_data_and_unsorted():
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["sk"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["sk", "one"], ["k"]),
        helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=-1, sorted=0),
    ]
    one = numpy_helper.from_array(np.array([1], dtype=np.int64), "one")
    report = lint(_model(nodes, [_x()], [_out(), _out("i", dtype=TensorProto.INT64)], [one]))
    assert {"topk-k", "topk-sorted"} <= _rules(report)


def test_topk_k_from_shape_is_allowed():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
        helper.make_node("Div", ["s", "two"], ["k"]),
        helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=-1),
    ]
    two = numpy_helper.from_array(np.array([2], dtype=np.int64), "two")
    report = lint(_model(nodes, [_x()], [_out(), _out("i", dtype=TensorProto.INT64)], [two]))
    assert "topk-k" not in _rules(report)


def test_nonzero_is_a_data_dependent_shape():
    nodes = [helper.make_node("NonZero", ["x"], ["y"])]
    assert {"data-dependent-shape", "static-shape"} <= _rules(
        lint(_model(nodes, [_x()], [_out(dtype=TensorProto.INT64)]))
    )


@pytest.mark.parametrize("reduction", ["add", "mul", "max"])
def test_scatter_with_reduction(reduction):
    nodes = [helper.make_node("ScatterElements", ["x", "idx", "upd"], ["y"], axis=1, reduction=reduction)]
    inits = [
        numpy_helper.from_array(np.zeros((1, 2), dtype=np.int64), "idx"),
        numpy_helper.from_array(np.ones((1, 2), dtype=np.float32), "upd"),
    ]
    assert _rules(lint(_model(nodes, [_x()], [_out()], inits))) == {"scatter-reduction"}


def test_scatter_without_reduction_is_fine():
    nodes = [helper.make_node("ScatterElements", ["x", "idx", "upd"], ["y"], axis=1)]
    inits = [
        numpy_helper.from_array(np.zeros((1, 2), dtype=np.int64), "idx"),
        numpy_helper.from_array(np.ones((1, 2), dtype=np.float32), "upd"),
    ]
    assert lint(_model(nodes, [_x()], [_out()], inits)).ok


def test_unique_unsupported_and_opset_cap():
    nodes = [helper.make_node("Unique", ["x"], ["y"])]
    report = lint(_model(nodes, [_x()], [_out()], opset=21), "trt10.3")
    assert {"unsupported-op", "opset"} <= _rules(report)
    assert "opset" not in _rules(lint(_model(nodes, [_x()], [_out()], opset=21), "trt10"))


def test_custom_domain_op():
    nodes = [helper.make_node("FusedThing", ["x"], ["y"], domain="com.microsoft")]
    model = _model(
        nodes,
        [_x()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        domains=["com.microsoft"],
    )
    assert "custom-op" in _rules(lint(model))


def test_dynamic_shapes():
    dyn = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens"])
    report = lint(_model([helper.make_node("Relu", ["x"], ["y"])], [dyn], [_out()]))
    assert "static-shape" in _rules(report)
    batch_only = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    report = lint(_model([helper.make_node("Relu", ["x"], ["y"])], [batch_only], [_out()]))
    assert report.ok and [w.rule for w in report.warnings] == ["dynamic-batch", "dynamic-batch"]


def test_loop_is_rejected():
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, [])],
    )
    nodes = [helper.make_node("Loop", ["n", "cond"], [], body=body), helper.make_node("Relu", ["x"], ["y"])]
    inits = [
        numpy_helper.from_array(np.array(2, dtype=np.int64), "n"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    assert "loop" in _rules(lint(_model(nodes, [_x()], [_out()], inits)))


def test_unknown_target():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_out()])
    with pytest.raises(TokensieveError, match="unknown lint target"):
        lint(model, "trt9")
