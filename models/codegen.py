"""CodeGen (CodeGenForCausalLM): the GPT-J graph with one fused ``qkv_proj``.

CodeGen was trained on 4 model-parallel shards and its fused projection keeps that layout:
the ``3C`` output rows are 4 blocks (``mp_num``), each holding a quarter of the queries, then
of the values, then of the keys (``[4, (q, v, k), C / 4]``). The queries are block 0 of each
shard in shard order, so the fix-up is :func:`per_head_rows` with 4 groups of 3 parts
(q = part 0, v = part 1, k = part 2), then the transpose. Interleaved partial RoPE, parallel
residual with one ``ln_1``, ``fc_in`` / ``fc_out`` MLP and ``lm_head`` with biases as GPT-J.
"""

from __future__ import annotations

from collections.abc import Mapping

from graphattn.models import gptj
from graphattn.models.common import integer, sliced_linear
from graphattn.spec import Architecture, ModelConfig, WeightSource, per_head_rows

MP_NUM = 4  # HF's CodeGenAttention.mp_num: fixed, not a config key
PARTS = {"q": 0, "v": 1, "k": 2}  # order inside each shard's block


def config_from_hf(config: Mapping[str, object]) -> ModelConfig:
    """Map a CodeGen ``config.json`` to ModelConfig (``n_ctx`` is unused, as in HF)."""
    hidden = integer(config, "n_embd", "hidden_size")
    if hidden % MP_NUM:
        raise ValueError(f"config n_embd={hidden} is not a multiple of CodeGen's mp_num=4")
    return gptj.model_config(config, "codegen")


def weights(cfg: ModelConfig) -> dict[str, WeightSource]:
    """Builder roles → CodeGenForCausalLM tensors (``transformer.h.{i}.attn.qkv_proj.weight``)."""
    plan = gptj.model_weights(cfg)
    c = cfg.hidden_size
    for i in range(cfg.num_layers):
        fused = f"transformer.h.{i}.attn.qkv_proj.weight"
        for part, index in PARTS.items():
            take = per_head_rows(index, 3, MP_NUM)
            plan[f"layers.{i}.{part}.weight"] = sliced_linear(fused, (0, c), 3 * c, c, take, part)
    return plan


ARCHITECTURE = Architecture(
    name="codegen",
    hf_architectures=("CodeGenForCausalLM",),
    config_from_hf=config_from_hf,
    weights=weights,
    ignored=(".attn.causal_mask", ".attn.masked_bias", ".attn.bias"),
)
