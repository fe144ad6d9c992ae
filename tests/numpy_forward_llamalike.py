"""NumPy forward passes (test side only) of SmolLM3, Ministral, Helium and GLM, as differences
from numpy_forward's Llama, written from transformers' modeling_<family>.py.

- SmolLM3: a layer rotates q/k only where the saved ``no_rope_layers[i]`` is 1.
- Ministral: Llama with ``layer_types`` sliding windows (numpy_forward's default rule).
- Helium: interleaved RoPE (pairs ``2i, 2i+1``: ``rotate_half`` on ``x[0::2]``/``x[1::2]``).
- GLM: interleaved partial RoPE (``partial_rotary_factor`` of each head) and a fused
  ``mlp.gate_up_proj`` whose first half of rows is the gate (``chunk(2)``).
"""

import numpy_forward


def _smollm3_uses_rope(config, layer):
    return bool(config["no_rope_layers"][layer])


def _glm_forward(w, config, input_ids, attention_mask, position_ids, past):
    split = dict(w)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        gate_up = split.pop(p + "gate_up_proj.weight")
        half = gate_up.shape[0] // 2
        split[p + "gate_proj.weight"], split[p + "up_proj.weight"] = gate_up[:half], gate_up[half:]
    return numpy_forward.llama_like_forward(
        split,
        config,
        input_ids,
        attention_mask,
        position_ids,
        past,
        {"interleaved": True, "window_types": ()},
    )


numpy_forward.FAMILIES["smollm3"] = {"uses_rope": _smollm3_uses_rope}
numpy_forward.FAMILIES["ministral"] = {}
numpy_forward.FAMILIES["helium"] = {"interleaved": True, "window_types": ()}
numpy_forward.FAMILIES["glm"] = {"forward": _glm_forward}
