"""GraphEmitter: a small graph builder on onnx_ir that knows about graphattn functions.

Nodes get stable, scoped names (``layers.3/attn``) and their outputs ``<node name>/<label>``,
so a graph can be read in Netron and compared layer by layer. Calling a graphattn function adds
its definition (and every graphattn function it calls, callees first) to the model.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.values import OnnxFunction

from graphattn.ops.domain import DOMAIN, OPSET_IMPORTS, lookup

AttributeValue = int | float | str | Sequence[int] | Sequence[float]
Dim = int | str | None


class GraphEmitter:
    """Builds one ``ir.Graph`` and collects the graphattn functions its nodes call."""

    def __init__(self, name: str = "graphattn") -> None:
        self.graph = ir.Graph([], [], nodes=[], opset_imports=dict(OPSET_IMPORTS), name=name)
        self._functions: dict[str, ir.Function] = {}
        self._value_names: set[str] = set()

    # ---------------------------------------------------------------- values
    def _claim(self, name: str) -> str:
        if name in self._value_names:
            raise ValueError(f"value name {name!r} is used twice in graph {self.graph.name!r}")
        self._value_names.add(name)
        return name

    def input(self, name: str, dtype: ir.DataType | None, shape: Sequence[Dim] | None) -> ir.Value:
        """Declare a graph input with a (possibly symbolic) shape; ``dtype=None`` and
        ``shape=None`` leave them unknown (function parameters)."""
        value = ir.Value(
            name=self._claim(name),
            type=None if dtype is None else ir.TensorType(dtype),
            shape=None if shape is None else ir.Shape(shape),
        )
        self.graph.inputs.append(value)
        return value

    def output(
        self,
        value: ir.Value,
        name: str,
        dtype: ir.DataType,
        shape: Sequence[Dim] | None = None,
    ) -> ir.Value:
        """Expose ``value`` as graph output ``name`` (renaming it); ``shape=None``: unknown."""
        if value in self.graph.inputs or value in self.graph.outputs or value.is_initializer():
            value = self.op("Identity", [value], name=name, outputs=("identity",))
        if value.name != name:
            self._value_names.discard(value.name or "")
            value.name = self._claim(name)
        value.type = ir.TensorType(dtype)
        value.shape = None if shape is None else ir.Shape(shape)
        self.graph.outputs.append(value)
        return value

    def initializer(self, name: str, array: "np.ndarray | ir.TensorProtocol") -> ir.Value:
        """Add a weight or constant as a graph initializer named ``name``."""
        tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array, name=name)
        tensor.name = name
        value = ir.Value(
            name=self._claim(name),
            type=ir.TensorType(tensor.dtype),
            shape=ir.Shape(tensor.shape),
            const_value=tensor,
        )
        self.graph.register_initializer(value)
        return value

    # ----------------------------------------------------------------- nodes
    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, AttributeValue] | None = None,
        *,
        name: str,
        outputs: Sequence[str] = ("output",),
        domain: str = "",
    ) -> ir.Value | tuple[ir.Value, ...]:
        """Append one node; returns its output (or outputs, as a tuple when several)."""
        node = ir.node(
            op_type,
            list(inputs),
            attributes=dict(attributes or {}),
            domain=domain,
            num_outputs=len(outputs),
            name=name,
        )
        for value, label in zip(node.outputs, outputs):
            value.name = self._claim(f"{name}/{label}")
        self.graph.append(node)
        return node.outputs[0] if len(outputs) == 1 else tuple(node.outputs)

    def call(
        self,
        function: OnnxFunction,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, AttributeValue] | None = None,
        *,
        name: str,
        outputs: Sequence[str] = ("output",),
    ) -> ir.Value | tuple[ir.Value, ...]:
        """Call a graphattn function, adding its definition to the model."""
        self._register(function)
        return self.op(function.name, inputs, attributes, name=name, outputs=outputs, domain=DOMAIN)

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        """A ``Constant`` node holding ``array`` (function bodies cannot hold initializers)."""
        return self.op("Constant", [], {"value": ir.tensor(array, name=name)}, name=name)

    def define(self, function: ir.Function, callees: Sequence[ir.Function] = ()) -> None:
        """Add a function built with onnx_ir (and the functions its body calls) to the model;
        a function defined twice under one name must have the same body."""
        for callee in callees:
            self._functions.setdefault(callee.name, callee)
        self._functions.setdefault(function.name, function)

    def call_defined(
        self,
        function_name: str,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, AttributeValue] | None = None,
        *,
        name: str,
        outputs: Sequence[str] = ("output",),
    ) -> ir.Value | tuple[ir.Value, ...]:
        """Call a function added with :meth:`define`."""
        if function_name not in self._functions:
            raise KeyError(f"graphattn function {function_name!r} is not defined in this graph")
        return self.op(function_name, inputs, attributes, name=name, outputs=outputs, domain=DOMAIN)

    def function_body(self, name: str, attributes: Sequence[ir.Attr]) -> ir.Function:
        """This emitter's graph as a function ``graphattn.<name>`` with ``attributes``
        (declared, given by every call); its callees stay in :attr:`functions`."""
        if self.graph.initializers:
            raise ValueError(f"function {name!r}: a function body cannot hold initializers")
        function = ir.Function(DOMAIN, name, graph=self.graph, attributes=list(attributes))
        function.opset_imports.update(OPSET_IMPORTS)
        return function

    def _register(self, function: OnnxFunction) -> None:
        if function.name in self._functions:
            return
        proto = function.to_function_proto()
        for node in proto.node:
            if node.domain == DOMAIN:
                self._register(lookup(node.op_type))
        ir_function = ir.serde.deserialize_function(proto)
        ir_function.opset_imports.update(OPSET_IMPORTS)  # one opset for every function
        self._functions[function.name] = ir_function

    # ----------------------------------------------------------------- model
    @property
    def functions(self) -> list[ir.Function]:
        """The graphattn functions called so far, each after the functions it calls."""
        return list(self._functions.values())

    def model(self, *, producer_version: str = "", metadata: Mapping[str, str] | None = None):
        """The finished ``ir.Model`` (IR version 10) holding the graph and its functions."""
        return ir.Model(
            self.graph,
            ir_version=10,
            producer_name="graphattn",
            producer_version=producer_version,
            functions=self.functions,
            metadata_props=dict(metadata or {}),
        )


def static_rank(value: ir.Value) -> int | None:
    """The rank of ``value`` when its shape is known, else None."""
    return None if value.shape is None else len(value.shape)


def require_rank(value: ir.Value, rank: int, parameter: str) -> None:
    """Raise ValueError naming ``parameter`` when ``value`` has a known rank other than ``rank``."""
    known = static_rank(value)
    if known is not None and known != rank:
        raise ValueError(f"{parameter} must have rank {rank}, got rank {known} ({value.shape})")
