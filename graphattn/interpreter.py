"""Run graphattn models with ONNX's NumPy reference evaluator (``onnx.reference``).

The evaluator executes model-local functions, but it needs every called function defined before
its caller and every attribute passed explicitly at each call site (it does not apply a
function's attribute defaults). :func:`prepare` rewrites a model to meet both needs;
:class:`Interpreter` runs it. Slow but independent of onnxruntime: use it to debug a graph.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

ModelLike = "onnx.ModelProto | ir.Model | str | os.PathLike"


def _as_proto(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if isinstance(model, ir.Model):
        return ir.serde.serialize_model(model)
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model), load_external_data=True)
    raise TypeError(f"expected an onnx.ModelProto, ir.Model or path, got {type(model).__name__}")


def _key(domain: str, name: str) -> tuple[str, str]:
    return (domain, name)


def _callees(function: onnx.FunctionProto, local: set[tuple[str, str]]) -> list[tuple[str, str]]:
    return [
        _key(n.domain, n.op_type)
        for n in _all_nodes(function.node)
        if _key(n.domain, n.op_type) in local
    ]


def _all_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterable[onnx.NodeProto]:
    for node in nodes:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _all_nodes(attribute.g.node)
            for graph in attribute.graphs:
                yield from _all_nodes(graph.node)


def order_functions(functions: Iterable[onnx.FunctionProto]) -> list[onnx.FunctionProto]:
    """Functions sorted so that each comes after every local function it calls."""
    by_key = {_key(f.domain, f.name): f for f in functions}
    ordered: list[onnx.FunctionProto] = []
    state: dict[tuple[str, str], str] = {}

    def visit(key: tuple[str, str]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            raise ValueError(f"local function {key[0]}.{key[1]} calls itself (a cycle)")
        state[key] = "visiting"
        for callee in _callees(by_key[key], set(by_key)):
            visit(callee)
        state[key] = "done"
        ordered.append(by_key[key])

    for key in by_key:
        visit(key)
    return ordered


def _fill_attributes(nodes: Iterable[onnx.NodeProto], by_key: Mapping) -> None:
    for node in _all_nodes(nodes):
        function = by_key.get(_key(node.domain, node.op_type))
        if function is None:
            continue
        given = {a.name for a in node.attribute}
        defaults = {a.name: a for a in function.attribute_proto}
        for name in list(function.attribute) + list(defaults):
            if name in given:
                continue
            if name not in defaults:
                raise ValueError(
                    f"node {node.name!r} calls {node.domain}.{node.op_type}"
                    f" without attribute {name!r}"
                )
            node.attribute.append(defaults[name])
            given.add(name)


def prepare(model) -> onnx.ModelProto:
    """A copy of ``model`` (proto, ir.Model or path) that ReferenceEvaluator can run."""
    proto = _as_proto(model)
    ordered = order_functions(proto.functions)
    by_key = {_key(f.domain, f.name): f for f in ordered}
    _fill_attributes(proto.graph.node, by_key)
    for function in ordered:
        _fill_attributes(function.node, by_key)
    del proto.functions[:]
    proto.functions.extend(ordered)
    return proto


class _Gelu(OpRun):
    """Gelu-20 in NumPy: onnx.reference only has it as a context-dependent function, which it
    cannot expand inside a model-local function."""

    op_domain = ""

    def _run(self, x, approximate="none"):  # noqa: D401 - OpRun protocol
        x64 = x.astype(np.float64)
        if approximate == "tanh":
            inner = np.sqrt(2.0 / np.pi) * (x64 + 0.044715 * x64**3)
            y = 0.5 * x64 * (1.0 + np.tanh(inner))
        else:
            from math import erf

            y = 0.5 * x64 * (1.0 + np.vectorize(erf)(x64 / np.sqrt(2.0)))
        return (y.astype(x.dtype),)


_Gelu.__name__ = "Gelu"


class _Evaluator(ReferenceEvaluator):
    """ReferenceEvaluator that passes our extra kernels down to local-function bodies too."""

    def __init__(self, proto, *args, **kwargs) -> None:
        kwargs.setdefault("new_ops", [_Gelu])
        super().__init__(proto, *args, **kwargs)


class Interpreter:
    """Runs a graphattn model in NumPy: ``Interpreter(model).run(feeds) -> {name: array}``."""

    def __init__(self, model) -> None:
        self.model = prepare(model)
        self._evaluator = _Evaluator(self.model)
        self.input_names = [i.name for i in self.model.graph.input]
        self.output_names = [o.name for o in self.model.graph.output]

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Evaluate the graph; returns the requested outputs (all by default) by name."""
        names = output_names or self.output_names
        results = self._evaluator.run(names, dict(feeds))
        return dict(zip(names, results))


def run(model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One-shot :class:`Interpreter` run of every output of ``model``."""
    return Interpreter(model).run(feeds)
