"""``genai_config.json`` in ONNX Runtime GenAI's format, so its apps load our exports."""

from __future__ import annotations

import re

import onnx_ir as ir

from graphattn.spec import KV_BUFFER_KEY, MIN_ORT_KEY, ModelConfig

CACHE_INPUTS_KEY = "graphattn.cache_inputs"
CACHE_OUTPUTS_KEY = "graphattn.cache_outputs"
GENAI_SUPPORT_KEY = "graphattn.onnxruntime_genai"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(.+)$")


def _dims(value: ir.Value) -> str:
    return ", ".join(str(d) for d in value.shape) if value.shape is not None else "?"


def cache_names(model: ir.Model) -> tuple[str, str] | None:
    """(inputs, outputs) as one line each, e.g. ``past_key_values.%d.latent [batch_size,
    past_sequence_length, 512], past_key_values.%d.rope_key [...]``, when the graph caches
    anything other than ``key``/``value`` (a latent cache); ``None`` for ordinary K/V.
    ``%d`` when every layer has the same tensors, else each layer's names spelled out."""
    layers: dict[int, list[tuple[str, str]]] = {}
    for value in model.graph.inputs:
        match = _PAST.match(value.name)
        if match:
            layers.setdefault(int(match.group(1)), []).append((match.group(2), _dims(value)))
    if not layers or all(n in ("key", "value") for t in layers.values() for n, _ in t):
        return None
    outputs = {v.name: _dims(v) for v in model.graph.outputs}
    uniform = len({tuple(t) for t in layers.values()}) == 1
    chosen = {"%d": layers[min(layers)]} if uniform else {str(i): t for i, t in layers.items()}
    past = ", ".join(f"past_key_values.{i}.{n} [{d}]" for i, t in chosen.items() for n, d in t)
    present = ", ".join(
        f"present.{i}.{n} [{outputs.get(f'present.{min(layers) if uniform else i}.{n}', '?')}]"
        for i, t in chosen.items()
        for n, _ in t
    )
    return past, present


def describe_graph(config: dict, model: ir.Model) -> dict:
    """Set in ``config`` (in place; also returned) what the compiled graph decided: whether
    its attention appends into the past buffer in place (``past_present_share_buffer``),
    whether it still has a ``position_ids`` input, and the oldest onnxruntime that runs it
    (top-level ``"graphattn.min_onnxruntime"``: GenAI ignores unknown *string* keys at the
    top level but refuses them inside ``model``, ``decoder`` and ``search``).

    A graph whose cache is not ``key``/``value`` (multi-head latent attention:
    ``past_key_values.{i}.latent``/``.rope_key``) gets the top-level strings
    ``"graphattn.cache_inputs"``/``"graphattn.cache_outputs"`` (the names and dims) and
    ``"graphattn.onnxruntime_genai": "not supported: ..."``; the decoder section keeps GenAI's
    fields (GenAI then fails at load on the missing key inputs rather than running wrongly)."""
    if MIN_ORT_KEY in model.metadata_props:
        config[MIN_ORT_KEY] = model.metadata_props[MIN_ORT_KEY]
    shared = model.metadata_props.get(KV_BUFFER_KEY) == "shared"
    config.setdefault("search", {})["past_present_share_buffer"] = shared
    inputs = config.setdefault("model", {}).setdefault("decoder", {}).setdefault("inputs", {})
    if any(v.name == "position_ids" for v in model.graph.inputs):
        inputs["position_ids"] = "position_ids"
    else:
        inputs.pop("position_ids", None)
    names = cache_names(model)
    if names is not None:
        # a latent (MLA) cache: GenAI allocates [batch, num_key_value_heads, T, head_size]
        # key/value caches only, so it cannot run this graph; the file stays valid (our
        # runtime reads it) and says so, with the real cache names (top-level string keys)
        config[CACHE_INPUTS_KEY], config[CACHE_OUTPUTS_KEY] = names
        config[GENAI_SUPPORT_KEY] = (
            "not supported: the cache holds the tensors in graphattn.cache_inputs, not"
            " [batch, num_key_value_heads, T, head_size] key/value (GenAI allocates only"
            " those); run it with graphattn.runtime or a loop over those inputs/outputs"
        )
    return config


def genai_config(cfg: ModelConfig, genai_type: str, filename: str = "model.onnx") -> dict:
    """The config dict for one decoder export (greedy search defaults, context-length max),
    for the graph as built; :func:`describe_graph` then records what compiling changed."""
    eos = cfg.eos_token_id
    pad = cfg.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) and eos else eos
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id,
            "context_length": cfg.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": genai_type,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": cfg.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
