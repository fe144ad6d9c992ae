"""onnxruntime contrib fusions for the ``ort`` target.

``Add(a, b)`` feeding ``RMSNormalization`` → ``com.microsoft.SkipSimplifiedLayerNormalization``
(residual add and RMS norm in one kernel; its 4th output is the sum for the next residual).
"""

from __future__ import annotations

import onnx_ir as ir

from graphattn.compiler.rewrite import MS_DOMAIN, attribute, take_over


def fuse_skip_rms_norm(graph: ir.Graph) -> int:
    """Fuse every residual Add + RMSNormalization pair; returns how many."""
    count = 0
    for norm in list(graph):
        if norm.op_type != "RMSNormalization" or norm.domain != "":
            continue
        if attribute(norm, "axis", -1) != -1 or attribute(norm, "stash_type", 1) != 1:
            continue
        add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
        if add is None or add.op_type != "Add" or add.domain != "":
            continue
        a, b = add.inputs
        shapes = [v.shape for v in (a, b)]
        if any(s is not None and len(s) != 3 for s in shapes) or a.const_value is not None:
            continue  # only the [B, S, C] + [B, S, C] residual
        fused = ir.node(
            "SkipSimplifiedLayerNormalization",
            [a, b, norm.inputs[1]],
            {"epsilon": float(attribute(norm, "epsilon", 1e-5))},
            domain=MS_DOMAIN,
            num_outputs=4,
            name=norm.name,
        )
        fused.outputs[0].name = f"{norm.name}/skip_norm_output"
        fused.outputs[1].name = fused.outputs[2].name = ""  # mean, inv_std_var: not computed
        fused.outputs[3].name = f"{norm.name}/skip_norm_sum"
        graph.insert_before(add, fused)
        take_over(norm.outputs[0], fused.outputs[0])
        take_over(add.outputs[0], fused.outputs[3])
        graph.remove([norm, add], safe=True)
        count += 1
    if count:
        graph.opset_imports[MS_DOMAIN] = 1
    return count
