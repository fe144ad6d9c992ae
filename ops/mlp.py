"""Feed-forward blocks on ``x [..., C]``; weights stored ``[in, out]`` (transposed at export)."""

import onnx_ir as ir

from graphattn.ops.domain import graphattn_function, op
from graphattn.ops.emit import GraphEmitter


@graphattn_function
def GeluMLP(x, fc_weight, fc_bias, proj_weight, proj_bias):
    """GPT-2 MLP: y [..., C] = gelu_tanh(x W_fc [C, F] + b_fc) W_proj [F, C] + b_proj."""
    hidden = op.Gelu(op.Add(op.MatMul(x, fc_weight), fc_bias), approximate="tanh")
    return op.Add(op.MatMul(hidden, proj_weight), proj_bias)


@graphattn_function
def SwiGLUMLP(x, gate_weight, up_weight, down_weight):
    """Gated SiLU MLP: y [..., C] = (silu(x W_gate [C, F]) * (x W_up [C, F])) W_down [F, C]."""
    gate = op.MatMul(x, gate_weight)
    activated = op.Mul(gate, op.Sigmoid(gate))
    return op.MatMul(op.Mul(activated, op.MatMul(x, up_weight)), down_weight)


def gelu_mlp(g: GraphEmitter, x: ir.Value, weights: dict[str, ir.Value], *, name: str):
    """Emit ``GeluMLP``; ``weights`` holds fc_weight, fc_bias, proj_weight, proj_bias."""
    keys = ("fc_weight", "fc_bias", "proj_weight", "proj_bias")
    return g.call(GeluMLP, [x, *_pick(weights, keys)], name=name)


def swiglu_mlp(g: GraphEmitter, x: ir.Value, weights: dict[str, ir.Value], *, name: str):
    """Emit ``SwiGLUMLP``; ``weights`` holds gate_weight, up_weight, down_weight."""
    return g.call(
        SwiGLUMLP, [x, *_pick(weights, ("gate_weight", "up_weight", "down_weight"))], name=name
    )


def _pick(weights: dict[str, ir.Value], keys: tuple[str, ...]) -> list[ir.Value]:
    missing = [key for key in keys if key not in weights]
    if missing:
        raise ValueError(f"MLP weights missing: {', '.join(missing)}")
    return [weights[key] for key in keys]
