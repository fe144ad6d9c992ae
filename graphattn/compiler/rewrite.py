"""Small helpers for rewriting an ``ir.Graph`` in place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx_ir as ir

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops


def attribute(node: ir.Node, name: str, default=None):
    """The Python value of a node attribute, or ``default``."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def take_over(old: ir.Value, new: ir.Value) -> None:
    """``new`` takes over ``old``'s uses (graph outputs included), name, type and shape."""
    name, value_type, shape = old.name, old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name, new.type, new.shape = name, value_type, shape


def add_initializer(graph: ir.Graph, tensor: ir.TensorProtocol) -> ir.Value:
    """Register ``tensor`` (named) as a graph initializer; returns its value."""
    value = ir.Value(
        name=tensor.name,
        type=ir.TensorType(tensor.dtype),
        shape=ir.Shape(tensor.shape),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def cast_like(graph: ir.Graph, anchor: ir.Node, value: ir.Value, like: ir.Value, name: str):
    """``CastLike(value, like)`` inserted before ``anchor`` (fp16 graphs: their cos/sin and
    attention bias are float32)."""
    node = ir.node("CastLike", [value, like], name=name)
    node.outputs[0].name = name
    graph.insert_before(anchor, node)
    return node.outputs[0]


def replace_node(
    graph: ir.Graph,
    old: ir.Node,
    op_type: str,
    inputs: Sequence[ir.Value | None],
    attributes: Mapping[str, object] | None = None,
    *,
    domain: str = "",
    num_outputs: int | None = None,
) -> ir.Node:
    """Put a new node where ``old`` was; its outputs take over old's uses and names."""
    count = len(old.outputs) if num_outputs is None else num_outputs
    new = ir.node(
        op_type,
        list(inputs),
        dict(attributes or {}),
        domain=domain,
        num_outputs=count,
        name=old.name,
    )
    graph.insert_before(old, new)
    for old_value, new_value in zip(old.outputs, new.outputs):
        take_over(old_value, new_value)
    graph.remove(old, safe=True)
    return new
