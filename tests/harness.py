"""Build a small model around some ops, check it, run it in onnxruntime and the interpreter."""

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphattn.interpreter import Interpreter
from graphattn.ops import GraphEmitter

FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64
BOOL = ir.DataType.BOOL

_NUMPY_TO_IR = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64, np.dtype(bool): BOOL}


def build(
    body: Callable[[GraphEmitter, dict[str, ir.Value]], Mapping[str, object]],
    feeds: Mapping[str, np.ndarray],
    symbolic: Mapping[str, Sequence[str | int]] | None = None,
) -> onnx.ModelProto:
    """A checked model with inputs ``feeds`` (shapes symbolic where given) and ``body``'s outputs.

    ``body`` returns ``{name: value}`` (rank-4 float32) or ``{name: (value, rank[, dtype])}``.
    """
    g = GraphEmitter("test")
    inputs = {}
    for name, array in feeds.items():
        shape = (symbolic or {}).get(name, array.shape)
        inputs[name] = g.input(name, _NUMPY_TO_IR[array.dtype], list(shape))
    for name, result in body(g, inputs).items():
        value, rank, dtype = (
            (*result, FLOAT)[:3] if isinstance(result, tuple) else (result, 4, FLOAT)
        )
        g.output(value, name, dtype, [None] * rank)
    proto = ir.serde.serialize_model(g.model())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def run_both(proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray]):
    """(onnxruntime CPU outputs, interpreter outputs), each a dict by output name."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    from_ort = dict(zip(names, session.run(names, dict(feeds))))
    from_interpreter = Interpreter(proto).run(feeds)
    return from_ort, from_interpreter


def assert_close(actual: np.ndarray, expected: np.ndarray, atol: float, what: str) -> None:
    """Whole-tensor max-abs comparison with a message naming ``what`` and the worst error."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    error = np.abs(actual.astype(np.float64) - expected).max() if actual.size else 0.0
    assert error <= atol, f"{what}: max abs error {error:.3g} > {atol:g}"
