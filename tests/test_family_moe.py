"""Mixtral, Qwen2-MoE and Qwen3-MoE against Hugging Face (tiny random configs built here):
softmax top-k routers renormalized (Mixtral, ``norm_topk_prob``) and not, Qwen2-MoE's shared
expert with its sigmoid gate, dense layers where the config says (``mlp_only_layers``,
``decoder_sparse_step``) and every layer sparse, sliding windows, Qwen3-MoE's q/k norm; every
target at fp32 (≤ 1e-4, left-padded batch, prefill + 4 decode steps), the NumPy witness
(tests/numpy_forward_moe.py), every precision, and what the ort target made of each MoE.

Random routers give near-ties, and a near-tie lets 1e-6 of float noise pick another expert.
Each model's seed is therefore the first of 0, 1, ... (below SEED_TRIES) whose HF run routes
every real token decisively: the top-k margin (the k-th minus the (k+1)-th softmax
probability, per real token, per MoE layer, at every call: prefill and each decode step)
exceeds MARGIN. The margins are recorded by forward hooks on HF's router (``gate``) modules
and asserted again on the run check_family compares.
"""

import json

import families
import numpy as np
import numpy_forward
import onnx
import pytest

from graphattn.compiler.moe import FLOAT_KERNEL_DECLINED, MOE_LOWERING_KEY
from graphattn.inspect import describe
from graphattn.models import architecture_for

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytestmark = pytest.mark.hf

MARGIN = 1e-3
SEED_TRIES = 20
STEPS = 4
SMALL = {
    "vocab_size": 96,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
MIXTRAL = {  # every layer sparse (always for Mixtral), renormalized top-2, a sliding window
    **SMALL,
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "num_hidden_layers": 2,
    "intermediate_size": 32,  # each expert's width
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 4,  # < the 9-token prompt
    "router_jitter_noise": 0.1,  # training only: inference ignores it, as transformers does
}
QWEN2_MOE = {  # a dense first layer (mlp_only_layers), shared expert + gate, no renormalizing
    **SMALL,
    "model_type": "qwen2_moe",
    "architectures": ["Qwen2MoeForCausalLM"],
    "num_hidden_layers": 3,
    "intermediate_size": 80,  # the dense layer
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 40,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": False,
    "mlp_only_layers": [0],
    "decoder_sparse_step": 1,
    "qkv_bias": True,
}
QWEN2_MOE_SPARSE = {  # every layer sparse, top-3 of 6 renormalized, a sliding first layer
    **QWEN2_MOE,
    "num_hidden_layers": 2,
    "num_experts": 6,
    "num_experts_per_tok": 3,
    "norm_topk_prob": True,
    "mlp_only_layers": [],
    "use_sliding_window": True,
    "sliding_window": 3,
    "max_window_layers": 1,
}
QWEN3_MOE = {  # dense layers 0 and 2 (decoder_sparse_step 2), renormalized top-2, q/k norm
    **SMALL,
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "num_hidden_layers": 3,
    "head_dim": 32,  # ≠ 64 / 4
    "intermediate_size": 80,
    "moe_intermediate_size": 32,  # whole int4 blocks: QMoE can take it
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 2,
}
QWEN3_MOE_SPARSE = {  # every layer sparse, not renormalized, every layer sliding, tied head
    **QWEN3_MOE,
    "num_hidden_layers": 2,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "use_sliding_window": True,
    "sliding_window": 5,
    "tie_word_embeddings": True,
}


# ------------------------------------------------------------------------ router margins
def top_k_margins(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Per token [N]: the k-th minus the (k+1)-th largest softmax probability of the router
    logits [N, E] (the order of the probabilities is the order of selection)."""
    logits = logits.astype(np.float64)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    ranked = -np.sort(-probabilities, axis=-1)
    return ranked[:, top_k - 1] - ranked[:, top_k]


class MarginRecorder:
    """Forward hooks on HF's router modules (``gate`` with ``top_k``; their first output is
    the router logits [B·S, E]): the top-k margins of every call."""

    def __init__(self, model) -> None:
        self.calls: list[np.ndarray] = []
        self.routers = 0
        for layer in model.model.layers:
            block = getattr(layer, "block_sparse_moe", None) or layer.mlp
            gate = getattr(block, "gate", None)
            if gate is not None and hasattr(gate, "top_k"):
                gate.register_forward_hook(self._record)
                self.routers += 1

    def _record(self, module, inputs, outputs) -> None:
        self.calls.append(top_k_margins(outputs[0].detach().numpy(), module.top_k))

    def smallest(self, steps: int = STEPS) -> float:
        """The smallest margin over the real tokens of a prefill of families.PROMPTS and
        ``steps`` decode steps (each router called once per call, in layer order)."""
        _, mask = families.left_padded(families.PROMPTS)
        masks = [mask] + [np.ones((mask.shape[0], 1), dtype=mask.dtype)] * steps
        assert self.routers > 0, "no router hooked"
        assert len(self.calls) == len(masks) * self.routers, "router calls do not match the run"
        real = [m.reshape(-1).astype(bool) for m in masks for _ in range(self.routers)]
        return min(float(margins[r].min()) for margins, r in zip(self.calls, real))


def decisive_seed(config: dict) -> int:
    """The first seed below SEED_TRIES whose HF run (prefill + STEPS greedy steps) routes
    every real token with all top-k margins above MARGIN."""
    ids, mask = families.left_padded(families.PROMPTS)
    for seed in range(SEED_TRIES):
        model = families.hf_model(config, seed=seed)
        recorder = MarginRecorder(model)
        families.hf_steps(model, ids, mask, STEPS)
        if recorder.smallest() > MARGIN:
            return seed
    raise AssertionError(f"no seed below {SEED_TRIES} routes {config['model_type']} decisively")


def check(tmp_path, monkeypatch, config: dict, targets=families.TARGETS) -> dict:
    """check_family on the decisive seed's model, asserting the margins of the compared run."""
    seed = decisive_seed(config)
    make_model, recorders = families.hf_model, []

    def seeded(cfg, **_):
        model = make_model(cfg, seed=seed)
        recorders.append(MarginRecorder(model))
        return model

    monkeypatch.setattr(families, "hf_model", seeded)
    assert numpy_forward.knows(config)
    exports = families.check_family(tmp_path, config, targets=targets)
    (recorder,) = recorders
    smallest = recorder.smallest()
    assert smallest > MARGIN, f"router margin {smallest:.3g} along the checked run (seed {seed})"
    return exports


def moe_kernels(export_dir) -> dict[str, str]:
    """What the compiler made of each layer's MoE block (``graphattn.moe_lowering``): layer →
    ``MoE`` / ``QMoE`` (onnxruntime's kernels) or ``portable (<form> experts): <reason>``."""
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    metadata = {p.key: p.value for p in model.metadata_props}
    decisions = json.loads(metadata.get(MOE_LOWERING_KEY, "[]"))
    return {
        d["layer"]: d["kernel"]
        if d["kernel"] != "portable"
        else f"portable ({d['form']} experts): " + "; ".join(d["reasons"].values())
        for d in decisions
    }


def qmoe_export(tmp_path, exports: dict) -> dict[str, str]:
    """An int4 ort export for onnxruntime 1.32 (where the CPU QMoE takes block-wise scales):
    its prefill logits finite and correlated with the fp32 ort export's at least
    families.PRECISION_FLOORS["int4"]; returns what each MoE block became."""
    from decoder_runner import Decoder

    from graphattn import export

    out = tmp_path / "ort-int4-ort1.32"
    export(
        tmp_path / "hf",
        out,
        target="ort",
        precision="int4",
        ort_version="1.32",
        last_logits_only=False,
    )
    ids, mask = families.left_padded(families.PROMPTS)
    real = mask.astype(bool)
    logits = Decoder(out)(ids, mask)[0][real].astype(np.float64)
    reference = Decoder(exports["ort"])(ids, mask)[0][real].astype(np.float64)
    assert np.isfinite(logits).all()
    correlation = float(np.corrcoef(logits.ravel(), reference.ravel())[0, 1])
    assert correlation >= families.PRECISION_FLOORS["int4"], correlation
    return moe_kernels(out)


STANDARD_OPS = "portable (routed experts): target portable: standard ops only"
# fp32/fp16 on ort: onnxruntime's float MoE kernel was measured slower than the routed
# portable experts (graphattn/compiler/moe.py); tests/test_moe.py checks the kernel itself
FLOAT_KERNEL = "portable (routed experts): " + FLOAT_KERNEL_DECLINED
QMOE_130 = (
    "portable (routed experts): onnxruntime 1.30's CPU QMoE rejects block-wise scales"
    " (block-wise QMoE needs 1.32)"
)


# ---------------------------------------------------------------------------------- tests
def test_mixtral_matches_transformers_on_every_target(tmp_path, monkeypatch):
    exports = check(tmp_path, monkeypatch, MIXTRAL)
    families.check_precisions(tmp_path / "hf", tmp_path)
    layers = ("layers.0", "layers.1")
    # ort fp32/fp16: the measured choice, the routed portable experts (MoE kernel declined)
    assert moe_kernels(exports["ort"]) == dict.fromkeys(layers, FLOAT_KERNEL)
    assert moe_kernels(tmp_path / "ort-fp16") == dict.fromkeys(layers, FLOAT_KERNEL)
    explained = describe(exports["ort"], explain=True)
    assert "mixture-of-experts lowering (per layer):" in explained
    declined = f"  layers.1: portable (routed experts)\n    not MoE: {FLOAT_KERNEL_DECLINED}"
    assert declined in explained
    assert moe_kernels(exports["portable"]) == dict.fromkeys(layers, STANDARD_OPS)
    # int4: portable experts for the default onnxruntime 1.30, QMoE for 1.32
    assert moe_kernels(tmp_path / "ort-int4") == dict.fromkeys(layers, QMOE_130)
    assert qmoe_export(tmp_path, exports) == dict.fromkeys(layers, "QMoE")
    # the CLI's --moe-kernel overrides the measured choice, on export and on compile
    from graphattn.cli import main

    hf = str(tmp_path / "hf")
    assert main(["export", hf, "-o", str(tmp_path / "always"), "--moe-kernel", "always"]) == 0
    assert moe_kernels(tmp_path / "always") == dict.fromkeys(layers, "MoE")
    functions = str(tmp_path / "functions")
    assert main(["export", hf, "-o", functions, "--target", "functions", "--quiet"]) == 0
    never = tmp_path / "never"
    assert main(["compile", functions, "-o", str(never), "--moe-kernel", "never"]) == 0
    assert moe_kernels(never) == dict.fromkeys(layers, STANDARD_OPS)


def test_qwen2_moe_dense_first_layer_and_gated_shared_expert(tmp_path, monkeypatch):
    exports = check(tmp_path, monkeypatch, QWEN2_MOE)
    families.check_precisions(tmp_path / "hf", tmp_path)
    sparse = ("layers.1", "layers.2")  # layer 0 is dense: no MoE block, no record
    assert moe_kernels(exports["ort"]) == dict.fromkeys(sparse, FLOAT_KERNEL)
    # norm_topk_prob off: the CPU QMoE would renormalize, so int4 experts stay portable
    kernels = qmoe_export(tmp_path, exports)
    assert set(kernels) == set(sparse)
    assert all("renormalizes" in k and k.startswith("portable") for k in kernels.values())


def test_qwen2_moe_every_layer_sparse_renormalized(tmp_path, monkeypatch):
    exports = check(tmp_path, monkeypatch, QWEN2_MOE_SPARSE)
    assert moe_kernels(exports["ort"]) == dict.fromkeys(("layers.0", "layers.1"), FLOAT_KERNEL)


def test_qwen3_moe_dense_layers_by_sparse_step(tmp_path, monkeypatch):
    exports = check(tmp_path, monkeypatch, QWEN3_MOE)
    families.check_precisions(tmp_path / "hf", tmp_path)
    assert moe_kernels(exports["ort"]) == {"layers.1": FLOAT_KERNEL}  # layers 0 and 2 are dense
    assert qmoe_export(tmp_path, exports) == {"layers.1": "QMoE"}


def test_qwen3_moe_every_layer_sparse_sliding(tmp_path, monkeypatch):
    exports = check(tmp_path, monkeypatch, QWEN3_MOE_SPARSE)
    assert moe_kernels(exports["ort"]) == dict.fromkeys(("layers.0", "layers.1"), FLOAT_KERNEL)


# ------------------------------------------------------------------- mapping and refusals
def _mlps(config: dict) -> list:
    cfg = architecture_for(config).config_from_hf(config)
    return [(layer.mlp.kind, layer.mlp.intermediate_size) for layer in cfg.layers]


def test_mapping_reads_every_moe_key():
    mixtral = architecture_for(MIXTRAL).config_from_hf(MIXTRAL)
    assert _mlps(MIXTRAL) == [("moe", 32)] * 2
    spec = mixtral.layers[0].mlp.moe
    assert (spec.num_experts, spec.top_k, spec.scores, spec.normalize) == (4, 2, "softmax", True)
    assert spec.shared_size is None
    assert [layer.attention.window for layer in mixtral.layers] == [4, 4]

    qwen2 = architecture_for(QWEN2_MOE).config_from_hf(QWEN2_MOE)
    assert _mlps(QWEN2_MOE) == [("gated", 80), ("moe", 24), ("moe", 24)]
    spec = qwen2.layers[1].mlp.moe
    assert (spec.num_experts, spec.top_k, spec.normalize, spec.shared_size) == (8, 2, False, 40)
    assert [layer.attention.window for layer in qwen2.layers] == [None] * 3
    sparse = architecture_for(QWEN2_MOE_SPARSE).config_from_hf(QWEN2_MOE_SPARSE)
    assert [layer.attention.window for layer in sparse.layers] == [3, None]  # even i < 1
    assert sparse.layers[0].mlp.moe.normalize and sparse.layers[0].mlp.moe.top_k == 3
    assert _mlps({**QWEN2_MOE, "decoder_sparse_step": 2}) == [("gated", 80), ("moe", 24)] + [
        ("gated", 80)
    ]
    assert _mlps({**QWEN2_MOE, "num_experts": 0}) == [("gated", 80)] * 3

    qwen3 = architecture_for(QWEN3_MOE).config_from_hf(QWEN3_MOE)
    assert qwen3.model_type == "qwen3_moe"
    assert _mlps(QWEN3_MOE) == [("gated", 80), ("moe", 32), ("gated", 80)]
    assert qwen3.layers[1].mlp.moe.normalize and qwen3.layers[1].mlp.moe.shared_size is None
    assert qwen3.layers[0].attention.qk_norm is not None and qwen3.head_dim == 32
    assert [layer.attention.window for layer in qwen3.layers] == [None] * 3
    windowed = architecture_for(QWEN3_MOE_SPARSE).config_from_hf(QWEN3_MOE_SPARSE)
    assert [layer.attention.window for layer in windowed.layers] == [5, 5]
    off = {**QWEN3_MOE_SPARSE, "use_sliding_window": False}  # sliding_window alone: no window
    assert architecture_for(off).config_from_hf(off).layers[0].attention.window is None
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts
    renamed = {k: v for k, v in QWEN3_MOE.items() if k != "num_experts"} | {"num_local_experts": 4}
    assert architecture_for(renamed).config_from_hf(renamed).layers[1].mlp.moe.num_experts == 4


def test_weight_plan_roles_and_shapes():
    plan = architecture_for(QWEN2_MOE).weights(
        architecture_for(QWEN2_MOE).config_from_hf(QWEN2_MOE)
    )
    m = "model.layers.1.mlp"
    assert plan["layers.1.mlp.router.weight"].source == f"{m}.gate.weight"
    assert plan["layers.1.mlp.router.weight"].graph_shape == (64, 8)
    assert plan["layers.1.mlp.experts.7.gate_weight"].graph_shape == (64, 24)
    assert plan["layers.1.mlp.experts.7.down_weight"].source == f"{m}.experts.7.down_proj.weight"
    assert plan["layers.1.mlp.experts.7.down_weight"].graph_shape == (24, 64)
    assert plan["layers.1.mlp.shared.up_weight"].graph_shape == (64, 40)
    assert plan["layers.1.mlp.shared_gate.weight"].source == f"{m}.shared_expert_gate.weight"
    assert plan["layers.1.mlp.shared_gate.weight"].graph_shape == (64, 1)
    assert "layers.1.mlp.gate_weight" not in plan  # the dense roles of a sparse layer are gone
    assert plan["layers.0.mlp.gate_weight"].graph_shape == (64, 80)
    assert not any(role.startswith("layers.0.mlp.") and "expert" in role for role in plan)

    mixtral = architecture_for(MIXTRAL).weights(architecture_for(MIXTRAL).config_from_hf(MIXTRAL))
    e = "model.layers.0.block_sparse_moe.experts.3"
    assert mixtral["layers.0.mlp.experts.3.gate_weight"].source == f"{e}.w1.weight"
    assert mixtral["layers.0.mlp.experts.3.up_weight"].source == f"{e}.w3.weight"
    assert mixtral["layers.0.mlp.experts.3.down_weight"].source == f"{e}.w2.weight"
    assert not any("shared" in role for role in mixtral)


@pytest.mark.parametrize(
    ("config", "key", "value"),
    [
        (MIXTRAL, "pretraining_tp", 2),
        (MIXTRAL, "hidden_act", "tanh"),
        (MIXTRAL, "num_experts_per_tok", 5),  # more than the 4 experts
        (MIXTRAL, "layer_types", ["full_attention", "sliding_attention"]),
        (MIXTRAL, "quantization_config", {"quant_method": "gptq"}),
        (QWEN2_MOE, "decoder_sparse_step", 0),
        (QWEN2_MOE, "mlp_only_layers", [3]),
        (QWEN2_MOE, "shared_expert_intermediate_size", 0),
        (QWEN2_MOE, "moe_intermediate_size", None),
        (QWEN2_MOE, "quantization_config", {"quant_method": "awq"}),
        (QWEN3_MOE, "layer_types", ["full_attention"] * 3),
        (QWEN3_MOE, "quantization_config", {"quant_method": "fp8"}),
        (QWEN3_MOE, "num_experts", -1),
        (
            QWEN3_MOE,
            "num_experts",
            1025,
        ),  # more than MAX_EXPERTS: the plan would only exhaust memory
        (QWEN2_MOE, "layer_types", "full_attention"),
    ],
)
def test_refused_keys_are_named(config, key, value):
    changed = {**config, key: value}
    with pytest.raises(ValueError, match=key):
        architecture_for(changed).config_from_hf(changed)


def test_sliding_layers_without_use_sliding_window_are_refused():
    config = {**QWEN2_MOE, "layer_types": ["sliding_attention"] + ["full_attention"] * 2}
    with pytest.raises(ValueError, match="use_sliding_window"):
        architecture_for(config).config_from_hf(config)


# The published config.json files of Mixtral-8x7B-v0.1, Qwen1.5-MoE-A2.7B and Qwen3-30B-A3B
# (the keys that matter here, written out: no download).
MIXTRAL_8X7B = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "output_router_logits": False,
    "sliding_window": None,
    "vocab_size": 32000,
}
QWEN15_MOE_A27B = {
    "model_type": "qwen2_moe",
    "architectures": ["Qwen2MoeForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "decoder_sparse_step": 1,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts_per_tok": 4,
    "num_experts": 60,
    "norm_topk_prob": False,
    "rope_theta": 1000000.0,
    "vocab_size": 151936,
}
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "head_dim": 128,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


@pytest.mark.parametrize(
    ("config", "experts", "top_k", "width", "normalize", "shared"),
    [
        (MIXTRAL_8X7B, 8, 2, 14336, True, None),
        (QWEN15_MOE_A27B, 60, 4, 1408, False, 5632),
        (QWEN3_30B_A3B, 128, 8, 768, True, None),
    ],
)
def test_published_configs_map(config, experts, top_k, width, normalize, shared):
    architecture = architecture_for(config)
    cfg = architecture.config_from_hf(config)
    specs = {layer.mlp.moe for layer in cfg.layers}
    assert len(specs) == 1  # every layer sparse
    (spec,) = specs
    assert (spec.num_experts, spec.top_k, spec.expert_size) == (experts, top_k, width)
    assert (spec.normalize, spec.shared_size) == (normalize, shared)
    assert all(layer.attention.window is None for layer in cfg.layers)
    plan = architecture.weights(cfg)
    c, last = cfg.hidden_size, cfg.num_layers - 1
    assert plan[f"layers.{last}.mlp.router.weight"].graph_shape == (c, experts)
    assert plan[f"layers.{last}.mlp.experts.{experts - 1}.down_weight"].graph_shape == (width, c)
    routed = sum(".experts." in role for role in plan)
    assert routed == cfg.num_layers * experts * 3
