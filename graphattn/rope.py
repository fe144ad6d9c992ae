"""cos/sin for one :class:`~graphattn.spec.RopeSpec`, computed once per graph and shared by
every layer with that RoPE.

The frequencies come from :func:`graphattn.ops.rope_scaling.rope_frequencies` (NumPy, at build
time); the graph multiplies them by ``position_ids``:

- static scalings (default, linear, llama3, yarn): ``RotaryCosSin``, or ``RotaryCosSinScaled``
  when an attention factor multiplies cos and sin (yarn);
- longrope: ``RotaryCosSinSwitched`` picks the long factors for a call whose positions reach
  past the original context, as transformers does per forward call;
- dynamic (NTK): ``RotaryCosSinDynamic`` recomputes the base from the call's length.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphattn.ops import GraphEmitter
from graphattn.ops.emit import require_rank
from graphattn.ops.rope_scaling import rope_frequencies
from graphattn.ops.rotary import (
    RotaryCosSin,
    RotaryCosSinDynamic,
    RotaryCosSinScaled,
    RotaryCosSinSwitched,
)
from graphattn.spec import RopeSpec


def rope_cos_sin(
    g: GraphEmitter, position_ids_BS: ir.Value, rope: RopeSpec, *, name: str
) -> tuple[ir.Value, ir.Value]:
    """``(cos, sin) [B, S, rotary_dim / 2]`` float32 for ``rope``."""
    require_rank(position_ids_BS, 2, "position_ids")
    freqs = rope_frequencies(
        rope.rotary_dim,
        rope.theta,
        rope.scaling,
        max_position_embeddings=rope.context,
        original_max_position_embeddings=rope.original_context,
    )

    def const(label: str, array) -> ir.Value:
        return g.initializer(f"{name}.{label}", np.asarray(array))

    inv_freq = const("inv_freq", freqs.inv_freq.astype(np.float32))

    def factor() -> ir.Value:
        return const("attention_factor", np.float32(freqs.attention_factor))

    outputs = ("cos", "sin")
    if freqs.dynamic is not None:
        d = freqs.dynamic
        exponents = np.arange(0, d.rotary_dim, 2, dtype=np.float64) / d.rotary_dim
        inputs = [
            position_ids_BS,
            inv_freq,
            const("exponents", exponents.astype(np.float32)),
            const("base", np.float32(d.base)),
            const("factor", np.float32(d.factor)),
            const("original_length", np.int64(d.original_length)),
        ]
        return g.call(RotaryCosSinDynamic, inputs, name=name, outputs=outputs)
    if freqs.long_inv_freq is not None:
        inputs = [
            position_ids_BS,
            inv_freq,
            const("long_inv_freq", freqs.long_inv_freq.astype(np.float32)),
            const("switch_length", np.int64(freqs.switch_length)),
            factor(),
        ]
        return g.call(RotaryCosSinSwitched, inputs, name=name, outputs=outputs)
    if freqs.attention_factor != 1.0:
        return g.call(
            RotaryCosSinScaled, [position_ids_BS, inv_freq, factor()], name=name, outputs=outputs
        )
    return g.call(RotaryCosSin, [position_ids_BS, inv_freq], name=name, outputs=outputs)
