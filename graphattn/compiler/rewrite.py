"""Small helpers for rewriting an ``ir.Graph`` in place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx_ir as ir


def attribute(node: ir.Node, name: str, default=None):
    """The Python value of a node attribute, or ``default``."""
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


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
        name, value_type, shape = old_value.name, old_value.type, old_value.shape
        old_value.replace_all_uses_with(new_value, replace_graph_outputs=True)
        old_value.name = None
        new_value.name, new_value.type, new_value.shape = name, value_type, shape
    graph.remove(old, safe=True)
    return new


def producer_constant(value: ir.Value) -> ir.TensorProtocol | None:
    """The constant tensor behind ``value`` (an initializer), if any."""
    return value.const_value


def uses(value: ir.Value) -> list[ir.Node]:
    """Nodes consuming ``value``."""
    return [user for user, _ in value.uses()]
