"""RoPE scaling (ops/rope_scaling.py) against transformers and against the NumPy reference.

Every type with non-default values at rotary_dim 6, 16 and 24 (24 as a partial rotation of a
32-wide head): the frequencies against transformers' ``ROPE_INIT_FUNCTIONS`` (float32 there,
relative error <= 1e-6) and against ``numpy_reference.rope_frequencies_reference`` (float64,
<= 1e-12); the run-time choices (longrope's switch, dynamic NTK's recomputed base) against what
transformers' rotary embedding modules do on a forward; every refusal names its key.
"""

import math
import re
from dataclasses import dataclass

import numpy as np
import numpy_reference as ref
import pytest

from graphattn.ops.rope_scaling import (
    SUPPORTED_TYPES,
    DynamicNTK,
    RopeFrequencies,
    dynamic_inv_freq,
    rope_frequencies,
)

HF_RTOL = 1e-6  # transformers computes in float32
REF_RTOL = 1e-12  # both float64
COS_ATOL = 2e-5  # transformers' float32 cos/sin at positions < 100


@dataclass(frozen=True)
class Case:
    name: str
    rotary_dim: int
    theta: float
    scaling: dict | None
    max_position_embeddings: int
    head_dim: int | None = None  # > rotary_dim: a partial rotation
    top_level_original: int | None = None  # Phi-3 style original_max_position_embeddings

    @property
    def kind(self) -> str:
        s = self.scaling or {}
        return s.get("rope_type") or s.get("type") or "default"

    def freqs(self) -> RopeFrequencies:
        return rope_frequencies(
            self.rotary_dim,
            self.theta,
            self.scaling,
            max_position_embeddings=self.max_position_embeddings,
            original_max_position_embeddings=self.top_level_original,
        )

    def reference(self, seq_len: int | None = None) -> tuple[np.ndarray, float]:
        return ref.rope_frequencies_reference(
            self.rotary_dim,
            self.theta,
            self.scaling,
            self.max_position_embeddings,
            self.top_level_original,
            seq_len=seq_len,
        )

    def original(self) -> int:
        if self.top_level_original is not None:
            return self.top_level_original
        s = self.scaling or {}
        return s.get("original_max_position_embeddings") or self.max_position_embeddings


def _partial(scaling: dict) -> dict:
    return {**scaling, "partial_rotary_factor": 0.75}


def _factors(start: float, step: float, n: int) -> list[float]:
    return [round(start + step * i, 4) for i in range(n)]


CASES = [
    Case("default-6", 6, 10000.0, None, 32),
    Case("default-16", 16, 500000.0, {"rope_type": "default"}, 32),
    Case("default-24-partial", 24, 1e6, _partial({"rope_type": "default"}), 32, head_dim=32),
    Case("linear-6", 6, 10000.0, {"type": "linear", "factor": 2.5}, 32),
    Case("linear-16", 16, 10000.0, {"rope_type": "linear", "factor": 2.5}, 32),
    Case("linear-24-partial", 24, 25000.0, _partial({"rope_type": "linear", "factor": 4}), 32, 32),
    Case("dynamic-6", 6, 10000.0, {"type": "dynamic", "factor": 2.5}, 32),
    Case("dynamic-16", 16, 10000.0, {"rope_type": "dynamic", "factor": 2.5}, 32),
    Case("dynamic-24-partial", 24, 5e5, _partial({"rope_type": "dynamic", "factor": 3}), 48, 32),
    # yarn: mscale unset, ramp strictly between 0 and 1 over several indices.
    Case(
        "yarn-16",
        16,
        10000.0,
        {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 2048},
        5120,
    ),
    # yarn: mscale and mscale_all_dim set, betas moved, no truncation, partial rotation.
    Case(
        "yarn-24-mscale-untruncated",
        24,
        50000.0,
        _partial(
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "beta_fast": 16,
                "beta_slow": 2.0,
                "mscale": 0.707,
                "mscale_all_dim": 1.3,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            }
        ),
        16384,
        head_dim=32,
    ),
    # yarn: mscale without mscale_all_dim (transformers then ignores mscale).
    Case(
        "yarn-6-mscale-only",
        6,
        10000.0,
        {"type": "yarn", "factor": 2.5, "mscale": 0.9, "original_max_position_embeddings": 64},
        160,
    ),
    # yarn: attention_factor given wins over mscale/mscale_all_dim (DeepSeek-V3 style keys).
    Case(
        "yarn-16-attention-factor",
        16,
        10000.0,
        {
            "rope_type": "yarn",
            "factor": 3.0,
            "attention_factor": 0.8,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "beta_fast": 24,
            "beta_slow": 1.5,
            "original_max_position_embeddings": 1024,
        },
        3072,
    ),
    # yarn: factor None -> max_position_embeddings / original; original from the top level.
    Case(
        "yarn-16-factor-none-top-level",
        16,
        10000.0,
        {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 100},
        2500,
        top_level_original=1000,
    ),
    # yarn: a small theta puts beta_slow's correction dimension past rotary_dim - 1 (clamped).
    Case(
        "yarn-16-clamped",
        16,
        10.0,
        {
            "rope_type": "yarn",
            "factor": 2.5,
            "truncate": False,
            "original_max_position_embeddings": 640,
        },
        1600,
    ),
    # longrope, Phi-3 style: original at the top level, no factor (ratio 64 / 16 = 4).
    Case(
        "longrope-16-phi3",
        16,
        10000.0,
        {
            "type": "longrope",
            "short_factor": _factors(1.0, 0.1, 8),
            "long_factor": _factors(1.5, 0.37, 8),
        },
        64,
        top_level_original=16,
    ),
    Case(
        "longrope-6-factor",
        6,
        10000.0,
        {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.25, 1.75],
            "long_factor": [2.0, 3.5, 7.25],
            "factor": 2.5,
            "original_max_position_embeddings": 20,
        },
        50,
    ),
    Case(
        "longrope-24-partial-attention-factor",
        24,
        10000.0,
        _partial(
            {
                "rope_type": "longrope",
                "short_factor": _factors(1.05, 0.02, 12),
                "long_factor": _factors(1.0, 0.9, 12),
                "attention_factor": 1.3,
                "original_max_position_embeddings": 24,
            }
        ),
        96,
        head_dim=32,
    ),
    # longrope with factor <= 1: attention_factor 1.
    Case(
        "longrope-16-no-growth",
        16,
        10000.0,
        {
            "rope_type": "longrope",
            "short_factor": _factors(1.0, 0.05, 8),
            "long_factor": _factors(2.0, 0.5, 8),
            "original_max_position_embeddings": 32,
        },
        32,
    ),
    Case(
        "llama3-16",
        16,
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        512,
    ),
    Case(
        "llama3-24-partial",
        24,
        500000.0,
        _partial(
            {
                "rope_type": "llama3",
                "factor": 2.5,
                "low_freq_factor": 1.5,
                "high_freq_factor": 3.5,
                "original_max_position_embeddings": 300,
            }
        ),
        1024,
        head_dim=32,
    ),
    Case(
        "llama3-6",
        6,
        10000.0,
        {
            "type": "llama3",
            "factor": 2.5,
            "low_freq_factor": 0.5,
            "high_freq_factor": 5.0,
            "original_max_position_embeddings": 200,
        },
        800,
    ),
]
BY_NAME = {case.name: case for case in CASES}


def call_inv_freq(freqs: RopeFrequencies, seq_len: int) -> np.ndarray:
    """The frequencies of a call with max(position_ids) + 1 == seq_len."""
    if freqs.dynamic is not None:
        return dynamic_inv_freq(freqs.dynamic, seq_len)
    if freqs.long_inv_freq is not None and seq_len > freqs.switch_length:
        return freqs.long_inv_freq
    return freqs.inv_freq


def cos_sin(position_ids: np.ndarray, inv_freq: np.ndarray, attention_factor: float):
    """cos, sin [B, S, rotary_dim] float64 in transformers' layout (frequencies repeated)."""
    angles = position_ids[..., None].astype(np.float64) * inv_freq
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles) * attention_factor, np.sin(angles) * attention_factor


# ---- transformers -------------------------------------------------------------------------


def _hf():
    pytest.importorskip("torch", reason="the hf extra (torch) is not installed")
    return pytest.importorskip("transformers", reason="the hf extra is not installed")


def hf_config(case: Case):
    transformers = _hf()
    params = {**(case.scaling or {"rope_type": "default"}), "rope_theta": case.theta}
    head_dim = case.head_dim or case.rotary_dim
    common = dict(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=case.max_position_embeddings,
    )
    if case.kind == "longrope" and case.top_level_original is not None:
        # Phi3Config always has a top-level original_max_position_embeddings (4096 by default).
        return transformers.Phi3Config(
            **common,
            original_max_position_embeddings=case.top_level_original,
            rope_parameters=params,
        )
    extra = {}
    if case.top_level_original is not None:
        extra["original_max_position_embeddings"] = case.top_level_original
    return transformers.LlamaConfig(**common, head_dim=head_dim, rope_parameters=params, **extra)


def hf_init(case: Case, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    _hf()
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = hf_config(case)
    if case.kind == "default":  # Phi-3's default honours partial_rotary_factor
        inv_freq, attention_factor = Phi3RotaryEmbedding.compute_default_rope_parameters(config)
    else:
        kwargs = {} if seq_len is None else {"seq_len": seq_len}
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[case.kind](config, **kwargs)
    return inv_freq.double().numpy(), float(attention_factor)


def hf_module(case: Case):
    _hf()
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = hf_config(case)
    module = Phi3RotaryEmbedding if case.kind in ("default", "longrope") else LlamaRotaryEmbedding
    return module(config)


def hf_forward(module, position_ids: np.ndarray):
    """cos, sin [B, S, rotary_dim] float64 of one forward, and the inv_freq it used."""
    import torch

    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = module(x, torch.from_numpy(position_ids.astype(np.int64)))
    return cos.double().numpy(), sin.double().numpy(), module.inv_freq.double().numpy()


@pytest.mark.hf
@pytest.mark.parametrize("name", list(BY_NAME))
def test_matches_transformers_init(name):
    case = BY_NAME[name]
    freqs = case.freqs()
    hf_inv_freq, hf_factor = hf_init(case)
    assert freqs.inv_freq.shape == (case.rotary_dim // 2,)
    assert freqs.inv_freq.dtype == np.float64
    np.testing.assert_allclose(freqs.inv_freq, hf_inv_freq, rtol=HF_RTOL, atol=0)
    assert freqs.attention_factor == pytest.approx(hf_factor, rel=1e-12, abs=0)
    if case.kind == "longrope":
        assert freqs.switch_length == case.original()
        hf_long, hf_long_factor = hf_init(case, seq_len=freqs.switch_length + 1)
        np.testing.assert_allclose(freqs.long_inv_freq, hf_long, rtol=HF_RTOL, atol=0)
        assert hf_long_factor == pytest.approx(freqs.attention_factor, rel=1e-12, abs=0)
        assert not np.allclose(freqs.long_inv_freq, freqs.inv_freq, rtol=1e-3)
    else:
        assert freqs.long_inv_freq is None and freqs.switch_length is None
    assert (freqs.dynamic is not None) == (case.kind == "dynamic")


@pytest.mark.hf
@pytest.mark.parametrize("name", [n for n, c in BY_NAME.items() if c.kind == "dynamic"])
def test_dynamic_matches_transformers_init(name):
    case = BY_NAME[name]
    dynamic = case.freqs().dynamic
    length = case.max_position_embeddings
    assert dynamic == DynamicNTK(case.theta, float(case.scaling["factor"]), length, case.rotary_dim)
    default = ref.rope_frequencies_reference(case.rotary_dim, case.theta, None, length)[0]
    for seq_len in (1, length - 1, length, length + 1, 3 * length + 7):
        hf_inv_freq, hf_factor = hf_init(case, seq_len=seq_len)
        ours = dynamic_inv_freq(dynamic, seq_len)
        np.testing.assert_allclose(ours, hf_inv_freq, rtol=HF_RTOL, atol=0)
        assert hf_factor == 1.0
        if seq_len <= length:
            np.testing.assert_allclose(ours, default, rtol=REF_RTOL, atol=0)
        else:  # every frequency but the first (always 1) is lower than the default
            assert np.all(ours[1:] < default[1:] * (1 - 1e-6))


@pytest.mark.hf
@pytest.mark.parametrize("name", list(BY_NAME))
def test_forward_matches_transformers(name):
    """cos/sin of transformers' rotary embedding module, short positions with an offset row."""
    case = BY_NAME[name]
    freqs = case.freqs()
    positions = np.stack([np.arange(5), np.arange(5) + 3])
    cos, sin, used = hf_forward(hf_module(case), positions)
    inv_freq = call_inv_freq(freqs, int(positions.max()) + 1)
    np.testing.assert_allclose(used, inv_freq, rtol=HF_RTOL, atol=0)
    want_cos, want_sin = cos_sin(positions, inv_freq, freqs.attention_factor)
    np.testing.assert_allclose(cos, want_cos, rtol=0, atol=COS_ATOL)
    np.testing.assert_allclose(sin, want_sin, rtol=0, atol=COS_ATOL)


LONGROPE = [n for n, c in BY_NAME.items() if c.kind == "longrope"]


@pytest.mark.hf
@pytest.mark.parametrize("name", LONGROPE)
def test_longrope_switch_matches_transformers(name):
    """Long frequencies exactly when max(position_ids) + 1 > original, per call, for the batch."""
    case = BY_NAME[name]
    freqs = case.freqs()
    switch = freqs.switch_length
    module = hf_module(case)  # one module, as a generation would use it: the choice is per call
    calls = [
        ("prefill below", np.arange(switch - 1)[None]),
        ("prefill at", np.arange(switch)[None]),
        ("prefill above", np.arange(switch + 1)[None]),
        ("back below after a long call", np.arange(3)[None]),
        ("decode at the last short position", np.array([[switch - 1]])),
        ("decode at the first long position", np.array([[switch]])),
        ("batch: one row crosses", np.stack([np.arange(4), np.arange(4) + switch - 3])),
        ("batch: no row crosses", np.stack([np.arange(4), np.arange(4) + switch - 4])),
    ]
    for label, positions in calls:
        seq_len = int(positions.max()) + 1
        use_long = seq_len > switch
        cos, sin, used = hf_forward(module, positions)
        want = freqs.long_inv_freq if use_long else freqs.inv_freq
        np.testing.assert_allclose(used, want, rtol=HF_RTOL, atol=0, err_msg=label)
        np.testing.assert_allclose(used, call_inv_freq(freqs, seq_len), rtol=HF_RTOL, err_msg=label)
        want_cos, want_sin = cos_sin(positions, want, freqs.attention_factor)
        np.testing.assert_allclose(cos, want_cos, rtol=0, atol=COS_ATOL, err_msg=label)
        np.testing.assert_allclose(sin, want_sin, rtol=0, atol=COS_ATOL, err_msg=label)
        other = freqs.inv_freq if use_long else freqs.long_inv_freq
        assert not np.allclose(cos, cos_sin(positions, other, freqs.attention_factor)[0], atol=1e-3)


DYNAMIC = [n for n, c in BY_NAME.items() if c.kind == "dynamic"]


@pytest.mark.hf
@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_forward_matches_transformers(name):
    """A fresh module and calls of non-decreasing length (one generation): HF recomputes the
    frequencies from max(position_ids) + 1 each time it grows, which dynamic_inv_freq reproduces."""
    case = BY_NAME[name]
    freqs = case.freqs()
    length = freqs.dynamic.original_length
    module = hf_module(case)
    calls = [
        np.arange(length - 1)[None],  # below
        np.arange(length)[None],  # at
        np.array([[length]]),  # one decode step above
        np.array([[length + 1]]),
        np.stack([np.arange(3) + length - 2, np.arange(3) + length + 4]),  # batch max decides
    ]
    for positions in calls:
        seq_len = int(positions.max()) + 1
        cos, sin, used = hf_forward(module, positions)
        want = dynamic_inv_freq(freqs.dynamic, seq_len)
        np.testing.assert_allclose(used, want, rtol=HF_RTOL, atol=0, err_msg=str(seq_len))
        want_cos, want_sin = cos_sin(positions, want, 1.0)
        np.testing.assert_allclose(cos, want_cos, rtol=0, atol=COS_ATOL, err_msg=str(seq_len))
        np.testing.assert_allclose(sin, want_sin, rtol=0, atol=COS_ATOL, err_msg=str(seq_len))


@pytest.mark.hf
def test_dynamic_transformers_module_remembers_its_longest_call():
    """Pins transformers' state across calls (what a stateless graph cannot follow): after a call
    of length M > L0 the module keeps M's frequencies for calls of length L0..M and resets to the
    defaults only on a call shorter than L0."""
    case = BY_NAME["dynamic-16"]
    dynamic = case.freqs().dynamic
    length = dynamic.original_length
    module = hf_module(case)
    for seq_len, uses in [
        (length + 8, length + 8),
        (length + 2, length + 8),  # shorter call, still the longest call's frequencies
        (length, length + 8),  # at L0: no reset either
        (length - 1, length - 1),  # below L0: reset to the defaults
        (length + 2, length + 2),
    ]:
        _, _, used = hf_forward(module, np.arange(seq_len)[None])
        np.testing.assert_allclose(
            used, dynamic_inv_freq(dynamic, uses), rtol=HF_RTOL, atol=0, err_msg=str(seq_len)
        )


# ---- NumPy reference -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BY_NAME))
def test_matches_numpy_reference(name):
    case = BY_NAME[name]
    freqs = case.freqs()
    want, want_factor = case.reference()
    np.testing.assert_allclose(freqs.inv_freq, want, rtol=REF_RTOL, atol=0)
    assert freqs.attention_factor == pytest.approx(want_factor, rel=REF_RTOL, abs=0)
    assert not freqs.inv_freq.flags.writeable
    if case.kind == "longrope":
        switch = case.original()
        assert freqs.switch_length == switch
        for seq_len in (1, switch - 1, switch, switch + 1, 10 * switch):
            want, _ = case.reference(seq_len)
            got = call_inv_freq(freqs, seq_len)
            np.testing.assert_allclose(got, want, rtol=REF_RTOL, atol=0, err_msg=str(seq_len))
            long = freqs.long_inv_freq if seq_len > switch else freqs.inv_freq
            assert got is long
    if case.kind == "dynamic":
        length = case.max_position_embeddings
        for seq_len in (1, length - 1, length, length + 1, 2 * length, 5 * length + 3):
            want, _ = case.reference(seq_len)
            got = dynamic_inv_freq(freqs.dynamic, seq_len)
            np.testing.assert_allclose(got, want, rtol=REF_RTOL, atol=0, err_msg=str(seq_len))


def test_scaled_types_really_scale():
    """Guard against cases that silently reduce to the defaults."""
    for case in CASES:
        if case.kind in ("default", "dynamic"):
            continue
        default = ref.rope_frequencies_reference(case.rotary_dim, case.theta, None, 1)[0]
        assert not np.allclose(case.freqs().inv_freq, default, rtol=1e-6), case.name


def test_yarn_attention_factor_defaults():
    base = {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 64}

    def factor_of(**extra):
        return rope_frequencies(
            16, 1e4, {**base, **extra}, max_position_embeddings=160
        ).attention_factor

    assert factor_of() == pytest.approx(0.1 * math.log(2.5) + 1)
    assert factor_of(mscale=0.707) == pytest.approx(0.1 * math.log(2.5) + 1)  # alone: unused
    both = (0.1 * 0.707 * math.log(2.5) + 1) / (0.1 * 1.3 * math.log(2.5) + 1)
    assert factor_of(mscale=0.707, mscale_all_dim=1.3) == pytest.approx(both)
    assert factor_of(mscale=1.0, mscale_all_dim=1.0) == 1.0
    assert factor_of(mscale=0.7, mscale_all_dim=0) == pytest.approx(0.1 * math.log(2.5) + 1)
    assert factor_of(attention_factor=0.5, mscale=2.0, mscale_all_dim=1.0) == 0.5
    assert factor_of(factor=0.8) == 1.0


def test_longrope_attention_factor_defaults():
    lists = {"short_factor": [1.0] * 4, "long_factor": [2.0] * 4}

    def factor_of(scaling, mpe, top=None):
        return rope_frequencies(
            8,
            1e4,
            {"type": "longrope", **lists, **scaling},
            max_position_embeddings=mpe,
            original_max_position_embeddings=top,
        ).attention_factor

    want = math.sqrt(1 + math.log(32) / math.log(4096))  # Phi-3-mini-128k
    assert factor_of({}, 131072, top=4096) == pytest.approx(want)
    assert factor_of({"original_max_position_embeddings": 4096}, 131072) == pytest.approx(want)
    # the top-level value wins over the one in the mapping, as in transformers
    assert factor_of({"original_max_position_embeddings": 99}, 131072, top=4096) == pytest.approx(
        want
    )
    assert factor_of({"factor": 2.5, "original_max_position_embeddings": 20}, 64) == pytest.approx(
        math.sqrt(1 + math.log(2.5) / math.log(20))
    )
    assert factor_of({}, 4096, top=4096) == 1.0


def test_type_key_precedence_and_neutral_keys():
    scaling = {"type": "default", "rope_type": "linear", "factor": 2.0}
    got = rope_frequencies(8, 1e4, scaling, max_position_embeddings=8)
    np.testing.assert_allclose(got.inv_freq, ref.rope_frequencies_reference(8, 1e4, None, 8)[0] / 2)
    neutral = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    got = rope_frequencies(8, 1e4, neutral, max_position_embeddings=8)
    np.testing.assert_allclose(got.inv_freq, ref.rope_frequencies_reference(8, 1e4, None, 8)[0])
    assert rope_frequencies(8, 1e4, {}, max_position_embeddings=8).attention_factor == 1.0


# ---- refusals ------------------------------------------------------------------------------

LISTS_4 = {"short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}

REFUSALS = [
    ("linear missing factor", {"rope_type": "linear"}, {}, "'factor'"),
    ("linear zero factor", {"rope_type": "linear", "factor": 0}, {}, "'factor'"),
    ("linear negative factor", {"type": "linear", "factor": -2.5}, {}, "'factor'"),
    ("linear string factor", {"type": "linear", "factor": "2"}, {}, "'factor'"),
    ("linear nan factor", {"type": "linear", "factor": float("nan")}, {}, "'factor'"),
    ("dynamic zero factor", {"rope_type": "dynamic", "factor": 0.0}, {}, "'factor'"),
    (
        "dynamic rotary_dim 2",
        {"rope_type": "dynamic", "factor": 2.0},
        {"rotary_dim": 2},
        "rotary_dim",
    ),
    ("yarn missing factor", {"rope_type": "yarn"}, {}, "'factor'"),
    ("yarn zero factor", {**YARN, "factor": 0}, {}, "'factor'"),
    ("yarn zero attention_factor", {**YARN, "attention_factor": 0.0}, {}, "'attention_factor'"),
    ("yarn betas crossed", {**YARN, "beta_fast": 1, "beta_slow": 32}, {}, "'beta_fast'"),
    ("yarn negative beta_slow", {**YARN, "beta_slow": -1}, {}, "'beta_slow'"),
    ("yarn truncate string", {**YARN, "truncate": "no"}, {}, "'truncate'"),
    ("yarn mscale string", {**YARN, "mscale": "1"}, {}, "'mscale'"),
    (
        "yarn original zero",
        {**YARN, "original_max_position_embeddings": 0},
        {},
        "'original_max_position_embeddings'",
    ),
    (
        "yarn original float",
        {**YARN, "original_max_position_embeddings": 64.5},
        {},
        "'original_max_position_embeddings'",
    ),
    ("yarn with a llama3 key", {**YARN, "low_freq_factor": 1.0}, {}, "'low_freq_factor'"),
    ("longrope missing long", {"type": "longrope", "short_factor": [1.0] * 4}, {}, "'long_factor'"),
    (
        "longrope short too short",
        {"type": "longrope", **LISTS_4, "short_factor": [1.0] * 3},
        {},
        "'short_factor'",
    ),
    (
        "longrope long too long",
        {"type": "longrope", **LISTS_4, "long_factor": [1.0] * 5},
        {},
        "'long_factor'",
    ),
    (
        "longrope long zero entry",
        {"type": "longrope", **LISTS_4, "long_factor": [1.0, 0.0, 1.0, 1.0]},
        {},
        "'long_factor'",
    ),
    (
        "longrope short not a list",
        {"type": "longrope", **LISTS_4, "short_factor": 1.0},
        {},
        "'short_factor'",
    ),
    (
        "longrope phi-moe mscales",
        {"type": "longrope", **LISTS_4, "short_mscale": 1.1, "long_mscale": 1.2},
        {},
        "'long_mscale', 'short_mscale'",
    ),
    ("longrope zero factor", {"type": "longrope", **LISTS_4, "factor": 0}, {}, "'factor'"),
    (
        "llama3 missing low",
        {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"},
        {},
        "'low_freq_factor'",
    ),
    ("llama3 high below low", {**LLAMA3, "high_freq_factor": 0.5}, {}, "'high_freq_factor'"),
    ("llama3 zero factor", {**LLAMA3, "factor": 0}, {}, "'factor'"),
    ("default with a factor", {"rope_type": "default", "factor": 2.0}, {}, "'factor'"),
    ("mrope", {"rope_type": "default", "mrope_section": [2, 1, 1]}, {}, "'mrope_section'"),
    ("linear with original", {**LLAMA3, "rope_type": "linear"}, {}, "'high_freq_factor'"),
    (
        "rope_theta disagrees",
        {"rope_type": "linear", "factor": 2, "rope_theta": 500.0},
        {},
        "'rope_theta'",
    ),
    ("theta zero", None, {"theta": 0.0}, "'rope_theta'"),
    (
        "max_position_embeddings zero",
        None,
        {"max_position_embeddings": 0},
        "'max_position_embeddings'",
    ),
    (
        "top-level original zero",
        YARN,
        {"original_max_position_embeddings": 0},
        "'original_max_position_embeddings'",
    ),
    ("odd rotary_dim", None, {"rotary_dim": 7}, "rotary_dim"),
]


@pytest.mark.parametrize(
    "scaling,overrides,key", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusal_names_the_key(scaling, overrides, key):
    args = {"rotary_dim": 8, "theta": 1e4, "max_position_embeddings": 256, **overrides}
    with pytest.raises(ValueError, match=re.escape(key)):
        rope_frequencies(
            args.pop("rotary_dim"),
            args.pop("theta"),
            scaling,
            **args,
        )


@pytest.mark.parametrize("kind", ["bogus", "proportional", "su", "mrope", "Linear"])
def test_unknown_type_names_it_and_lists_supported(kind):
    with pytest.raises(ValueError, match=re.escape(repr(kind))) as caught:
        rope_frequencies(8, 1e4, {"rope_type": kind, "factor": 2.0}, max_position_embeddings=8)
    for supported in SUPPORTED_TYPES:
        assert supported in str(caught.value)
    with pytest.raises(ValueError, match=re.escape(repr(kind))):
        rope_frequencies(8, 1e4, {"type": kind}, max_position_embeddings=8)


def test_dynamic_inv_freq_refuses_bad_seq_len():
    dynamic = rope_frequencies(
        8, 1e4, {"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16
    ).dynamic
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="'seq_len'"):
            dynamic_inv_freq(dynamic, bad)
