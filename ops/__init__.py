"""graphattn.ops: attention building blocks as onnxscript functions in domain ``graphattn``.

Each module holds the functions (graph bodies, authored at ONNX opset 23) and small Python
emitters that validate parameters and add a call to a :class:`GraphEmitter` graph.
"""

from graphattn.ops.attention import (
    grouped_query_attention,
    multi_head_attention,
    multi_query_attention,
    scaled_dot_product_attention,
)
from graphattn.ops.documents import document_attention_bias, document_position_ids
from graphattn.ops.domain import DEFAULT_OPSET, DOMAIN, DOMAIN_VERSION, registered_functions
from graphattn.ops.emit import GraphEmitter
from graphattn.ops.heads import lm_head, merge_heads, split_heads
from graphattn.ops.masks import alibi_bias, attention_bias, position_bias, position_ids_from_mask
from graphattn.ops.mlp import gelu_mlp, swiglu_mlp
from graphattn.ops.norms import layer_norm, qk_norm, rms_norm
from graphattn.ops.paged import paged_attention_bias, paged_kv
from graphattn.ops.rotary import apply_rotary, inverse_frequencies, rotary_cos_sin

__all__ = [
    "DEFAULT_OPSET",
    "DOMAIN",
    "DOMAIN_VERSION",
    "GraphEmitter",
    "alibi_bias",
    "apply_rotary",
    "attention_bias",
    "document_attention_bias",
    "document_position_ids",
    "gelu_mlp",
    "grouped_query_attention",
    "inverse_frequencies",
    "layer_norm",
    "lm_head",
    "merge_heads",
    "multi_head_attention",
    "multi_query_attention",
    "paged_attention_bias",
    "paged_kv",
    "position_bias",
    "position_ids_from_mask",
    "qk_norm",
    "registered_functions",
    "rms_norm",
    "rotary_cos_sin",
    "scaled_dot_product_attention",
    "split_heads",
    "swiglu_mlp",
]
