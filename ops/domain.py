"""The `graphattn` function domain: one opset for every function, and a registry by name.

Every function in ``graphattn.ops`` is authored with :func:`graphattn_function`, which compiles
it with onnxscript in domain ``graphattn`` (version 1) against the default ONNX opset 23, and
records it so that a graph calling it can collect its FunctionProto (and its callees').
"""

from onnxscript import opset23 as op
from onnxscript import script
from onnxscript.values import OnnxFunction, Opset

DOMAIN = "graphattn"
DOMAIN_VERSION = 1
DEFAULT_OPSET = 23
OPSET_IMPORTS = {"": DEFAULT_OPSET, DOMAIN: DOMAIN_VERSION}

graphattn = Opset(DOMAIN, DOMAIN_VERSION)

# Value of a dropped position in an additive attention bias. -65504 is the lowest float16, so the
# same bias works in float16 and float32 graphs, and a row with every key dropped stays finite.
MASKED_BIAS = -65504.0
# An additive bias at or below this value counts as "dropped" (scalable softmax counts the rest).
DROPPED_BELOW = -10000.0

_REGISTRY: dict[str, OnnxFunction] = {}


def graphattn_function(
    python_function, *, name: str | None = None, doc: str | None = None
) -> OnnxFunction:
    """Compile ``python_function`` as an onnxscript function in domain graphattn and register it.

    ``name``/``doc`` give the function another name and docstring than its ``def``: one body
    written once in a factory (its free variables choosing the functions it calls) is then
    compiled into several named functions."""
    if name is not None:
        python_function.__name__ = python_function.__qualname__ = name
    if doc is not None:
        python_function.__doc__ = doc
    compiled = script(graphattn, default_opset=op)(python_function)
    if name is not None or doc is not None:
        function_ir = compiled.function_ir
        function_ir.name = function_ir.graph.name = name or function_ir.name
        function_ir.doc_string = doc if doc is not None else function_ir.doc_string
        compiled = OnnxFunction(
            graphattn, python_function, function_ir, compiled.source, compiled.kwargs
        )
    if compiled.name in _REGISTRY:
        raise ValueError(f"graphattn function {compiled.name!r} is defined twice")
    _REGISTRY[compiled.name] = compiled
    return compiled


def lookup(name: str) -> OnnxFunction:
    """The registered graphattn function called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no graphattn function named {name!r}") from None


def registered_functions() -> dict[str, OnnxFunction]:
    """All graphattn functions defined so far, by name."""
    return dict(_REGISTRY)
