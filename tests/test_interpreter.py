"""The interpreter orders callee functions first and makes attributes explicit."""

import numpy as np
import onnx
import pytest

from graphattn.interpreter import Interpreter, order_functions, prepare

CALLER_FIRST = """
<ir_version: 10, opset_import: ["" : 23, "local" : 1]>
main (float[2] x) => (float[2] y) {
    y = local.Outer(x)
}
<domain: "local", opset_import: ["" : 23, "local" : 1]>
Outer <gain>(a) => (b) {
    b = local.Inner <gain: float = @gain> (a)
}
<domain: "local", opset_import: ["" : 23]>
Inner <gain>(a) => (b) {
    g = Constant <value_float: float = @gain> ()
    b = Mul (a, g)
}
"""


def with_default_gain(text: str, default: float) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    outer = next(f for f in model.functions if f.name == "Outer")
    del outer.attribute[:]
    outer.attribute_proto.append(onnx.helper.make_attribute("gain", default))
    return model


def test_functions_are_ordered_callees_first():
    model = onnx.parser.parse_model(CALLER_FIRST)
    assert [f.name for f in model.functions] == ["Outer", "Inner"]
    assert [f.name for f in order_functions(model.functions)] == ["Inner", "Outer"]


def test_default_attributes_are_filled_and_model_runs():
    model = with_default_gain(CALLER_FIRST, 3.0)
    prepared = prepare(model)
    (call,) = prepared.graph.node
    assert [a.name for a in call.attribute] == ["gain"]
    result = Interpreter(model).run({"x": np.array([1.0, 2.0], dtype=np.float32)})
    np.testing.assert_array_equal(result["y"], np.array([3.0, 6.0], dtype=np.float32))


def test_missing_attribute_without_default_is_named():
    model = onnx.parser.parse_model(CALLER_FIRST)
    with pytest.raises(ValueError, match="without attribute 'gain'"):
        prepare(model)
