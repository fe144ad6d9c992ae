"""Checking a decoder family against Hugging Face transformers, step by step.

``check_family(tmp_path, config)`` builds a tiny random HF model from ``config`` (no download),
saves it as sharded safetensors, exports it to every target at fp32, then runs a left-padded
batch of three rows through HF eager and through each export: a prefill, then ``steps``
greedy decode steps (HF's argmax tokens fed to both), each with its own KV cache. Logits of
every real position are compared at every step (``atol``), and the NumPy forward pass
(``numpy_forward``, sharing nothing with the package) is checked on the prefill too when it
knows the family.

``lowering(export_dir)`` returns the per-layer decisions ``inspect --explain`` prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from decoder_runner import Decoder, positions_for
from harness import assert_close

from graphattn import export
from graphattn.spec import LOWERING_KEY

TARGETS = ("functions", "portable", "ort")
ATOL = 1e-4
# Three left-padded rows (lengths 9, 5, 7): windows of 3-4 are smaller than the prompt.
PROMPTS = [[5, 17, 42, 8, 11, 60, 3, 33, 21], [40, 41, 9, 12, 7], [7, 3, 90, 12, 55, 18, 6]]


def left_padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def hf_model(config: dict, seed: int = 0, norm_scale: float = 0.1, scale: float = 0.2):
    """A random HF causal LM (eager attention) for ``config``; norm weights near one (or
    near zero for ``1 + w`` norms: the perturbation is what the test sees either way)."""
    import torch
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2]:
                parameter.copy_(1 + norm_scale * torch.randn_like(parameter))
                if name.endswith("bias"):
                    parameter.copy_(norm_scale * torch.randn_like(parameter))
            else:
                parameter.copy_(scale * torch.randn_like(parameter))
    return model.eval().float()


def hf_steps(model, ids: np.ndarray, mask: np.ndarray, steps: int):
    """HF logits per call (prefill ``[B, S, V]``, then ``[B, 1, V]`` per step) and the greedy
    tokens fed, with HF's own cache."""
    import inspect

    import torch

    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else None
    cache_name = cache_name or "past_key_values"
    logits_per_call, fed = [], []
    past = None
    step_ids, step_mask = ids, mask
    with torch.no_grad():
        for _ in range(steps + 1):
            positions = positions_for(step_mask, step_ids.shape[1])
            out = model(
                input_ids=torch.from_numpy(step_ids),
                attention_mask=torch.from_numpy(step_mask),
                position_ids=torch.from_numpy(positions),
                use_cache=True,
                **{cache_name: past},
            )
            past = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
            logits = out.logits.double().numpy()
            logits_per_call.append(logits)
            token = logits[:, -1].argmax(-1)[:, None]
            fed.append(token)
            step_ids = token
            step_mask = np.concatenate([step_mask, np.ones_like(token)], axis=1)
    return logits_per_call, fed


def our_steps(export_dir: Path, ids: np.ndarray, mask: np.ndarray, fed: list[np.ndarray]):
    """Our export's logits per call, fed the same tokens as HF."""
    decoder = Decoder(export_dir)
    logits_per_call = []
    past, step_ids, step_mask = None, ids, mask
    for token in fed:
        logits, past = decoder(step_ids, step_mask, past)
        logits_per_call.append(logits.astype(np.float64))
        step_ids = token
        step_mask = np.concatenate([step_mask, np.ones_like(token)], axis=1)
    return logits_per_call


def compare_calls(ours, theirs, mask: np.ndarray, atol: float, what: str) -> None:
    """Whole-tensor comparison of every call's logits on the real (unpadded) positions."""
    real = mask[:, :, None].astype(bool)
    assert_close(np.where(real, ours[0], 0), np.where(real, theirs[0], 0), atol, f"{what} prefill")
    for step, (mine, hf) in enumerate(zip(ours[1:], theirs[1:])):
        assert_close(mine, hf, atol, f"{what} decode step {step + 1}")


def hf_weights(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    weights = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def check_family(
    tmp_path: Path,
    config: dict,
    *,
    targets=TARGETS,
    steps: int = 4,
    atol: float = ATOL,
    prompts=PROMPTS,
    numpy_check: bool = True,
) -> dict[str, Path]:
    """Export ``config``'s random model to ``targets`` and compare with HF (see module
    docstring); returns the export directories by target."""
    model = hf_model(config)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, safe_serialization=True, max_shard_size="200KB")
    ids, mask = left_padded(prompts)
    theirs, fed = hf_steps(model, ids, mask, steps)
    exports = {}
    for target in targets:
        out = tmp_path / target
        export(hf_dir, out, target=target, last_logits_only=False)
        compare_calls(our_steps(out, ids, mask, fed), theirs, mask, atol, f"{target}")
        exports[target] = out
    if numpy_check:
        import numpy_forward

        saved = json.loads((hf_dir / "config.json").read_text())
        if numpy_forward.knows(saved):
            positions = positions_for(mask, ids.shape[1])
            expected, _ = numpy_forward.forward(hf_weights(hf_dir), saved, ids, mask, positions)
            real = mask[:, :, None].astype(bool)
            assert_close(
                np.where(real, expected, 0), np.where(real, theirs[0], 0), atol, "numpy vs hf"
            )
    return exports


def lowering(export_dir: Path) -> list[dict]:
    """Per-layer decisions recorded by the compiler (``inspect --explain``)."""
    model = onnx.load(str(export_dir / "model.onnx"), load_external_data=False)
    metadata = {p.key: p.value for p in model.metadata_props}
    return json.loads(metadata[LOWERING_KEY])


def kernels(export_dir: Path) -> list[str]:
    """The kernel each layer's attention block became."""
    return [d["kernel"] for d in lowering(export_dir)]


PRECISION_FLOORS = {"fp16": 0.999, "int8": 0.98, "int4": 0.8}


def check_precisions(hf_dir: Path, tmp_path: Path, targets=("portable", "ort")) -> dict:
    """Export ``hf_dir`` at fp16, int8 and int4 on ``targets`` and compare each prefill's
    logits with the fp32 export of the same target: finite, and correlated with fp32 at least
    PRECISION_FLOORS (a scale-free check that a tiny random model's quantization noise
    passes and a broken graph does not). Returns the correlations."""
    ids, mask = left_padded(PROMPTS)
    real = mask.astype(bool)
    seen = {}
    for target in targets:
        reference_dir = tmp_path / f"{target}-fp32"
        if not reference_dir.exists():
            export(hf_dir, reference_dir, target=target, last_logits_only=False)
        reference = Decoder(reference_dir)(ids, mask)[0][real].astype(np.float64)
        for precision, floor in PRECISION_FLOORS.items():
            out = tmp_path / f"{target}-{precision}"
            export(hf_dir, out, target=target, precision=precision, last_logits_only=False)
            logits = Decoder(out)(ids, mask)[0][real].astype(np.float64)
            assert np.isfinite(logits).all(), f"{target} {precision}: non-finite logits"
            correlation = float(np.corrcoef(logits.ravel(), reference.ravel())[0, 1])
            assert correlation >= floor, f"{target} {precision}: correlation {correlation}"
            seen[(target, precision)] = correlation
    return seen
