"""``dequantize_at_load``: int4/int8 weights stored as blocks and rebuilt by Cast/Mul/Add
nodes on initializers, which onnxruntime constant-folds at load (float compute).

The saved graph holds the 4-/8-bit initializers and none of the quantized kernels; a GGUF's
blocks give the logits of its fp32 export; round-to-nearest gives the logits of an
independent NumPy forward pass over the dequantized weights; onnxruntime folds every chain
at load; on SmolLM2 (slow) the greedy tokens equal the fp32 export's, in Python and in the
browser page (onnxruntime-web, WASM)."""

import json
import subprocess
import sys

import checkpoints
import js_apps
import numpy as np
import numpy_forward
import onnx
import onnxruntime as ort
import pytest
from decoder_runner import Decoder, positions_for
from harness import assert_close

from graphattn import export
from graphattn.compiler import CompileOptions
from graphattn.inspect import describe
from graphattn.runtime import Generator

TP = onnx.TensorProto
BLOCK_TYPES = {4: {TP.UINT4, TP.INT4}, 8: {TP.UINT8, TP.INT8}}
QUANTIZED_KERNELS = {"MatMulNBits", "DequantizeLinear", "GatherBlockQuantized"}
PROMPT = [5, 17, 42, 8, 11, 60, 3]
MODELS = {
    "llama": checkpoints.LLAMA,  # untied embeddings and output projection
    # tied table (Gather and the output projection read one rebuilt table); intermediate
    # 48 is not a whole number of 32-blocks: down_proj's K is padded, then sliced
    "llama-tied": checkpoints.LLAMA_VARIANTS["llama-mha-tied"],
    # head_dim 16: the ort target lowers attention to GroupQueryAttention
    "llama-wide": checkpoints.llama_variant(hidden_size=64, intermediate_size=96),
    "gpt2": checkpoints.GPT2,  # tied, and a position-embedding Gather
}


@pytest.fixture(scope="module", params=list(MODELS))
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"dal-{request.param}")
    checkpoints.write_checkpoint(root / "hf", MODELS[request.param], seed=17)
    export(root / "hf", root / "fp32", target="portable", last_logits_only=False)
    return request.param, root


def logits_of(out_dir, engine="ort"):
    ids = np.array([PROMPT, PROMPT[::-1]])
    logits, _ = Decoder(out_dir, engine=engine)(ids, np.ones_like(ids))
    return logits.astype(np.float64)


def load_graph(out_dir):
    return onnx.load(str(out_dir / "model.onnx"), load_external_data=False)


def quantized_initializers(graph, bits):
    return [i for i in graph.initializer if i.data_type in BLOCK_TYPES[bits]]


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_graph_stores_blocks_and_computes_in_float(checkpoint, target, precision):
    name, root = checkpoint
    out = root / f"{target}-{precision}"
    export(
        root / "hf",
        out,
        target=target,
        precision=precision,
        dequantize_at_load=True,
        last_logits_only=False,
    )
    model = load_graph(out)
    graph, bits = model.graph, int(precision[3:])
    ops = {n.op_type for n in graph.node}
    assert not ops & QUANTIZED_KERNELS, ops
    if target == "portable":
        assert {n.domain for n in graph.node} == {""}
    assert dict((p.key, p.value) for p in model.metadata_props)["graphattn.weights"] == (
        "dequantize_at_load"
    )
    assert "weights=dequantize_at_load" in describe(out)
    # the export's optimizer ran before the pass: the blocks are saved, not folded
    stored = quantized_initializers(graph, bits)
    assert all(i.name.endswith((".q", ".zero_points")) for i in stored)
    blocks = [i for i in stored if i.name.endswith(".q")]
    assert blocks
    float_tables = {
        i.name for i in graph.initializer if i.data_type == TP.FLOAT and len(i.dims) == 2
    }
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            assert node.input[1] not in float_tables, (node.name, node.input[1])
        if node.op_type == "Gather":
            assert node.input[0] not in float_tables, (node.name, node.input[0])
    fp32_size = (root / "fp32" / "model.onnx.data").stat().st_size
    size = (out / "model.onnx.data").stat().st_size
    # the tiny models' float remainder (norms, biases, ort's RoPE tables) keeps this above
    # the 1/8 and 1/4 of the weights alone
    assert size < {"int4": 0.4, "int8": 0.55}[precision] * fp32_size, (size, fp32_size)
    if name in ("llama-tied", "gpt2"):  # one rebuilt token table, read by Gather and Gemm
        table = "transformer.wte.weight" if name == "gpt2" else "model.embed_tokens.weight"
        tables = [i.name for i in blocks if i.name.startswith(table)]
        assert len(tables) == 1, tables
    logits = logits_of(out)
    if target == "portable":  # standard ONNX: the NumPy interpreter runs it too
        assert_close(logits_of(out, "interpreter"), logits, 1e-5, f"{name} interpreter")
    # a second witness for the weights: the MatMulNBits kernel (float compute) on the same
    # round-to-nearest blocks
    kernel = root / f"{target}-{precision}-kernel"
    export(root / "hf", kernel, target="ort", precision=precision, accuracy_level=0)
    ids = np.array([PROMPT])
    last, _ = Decoder(kernel)(ids, np.ones_like(ids))
    assert_close(logits[:1, -1], last[:, -1].astype(np.float64), 1e-4, f"{name} vs MatMulNBits")


def round_to_nearest(weight, bits, block_size=32, symmetric=False):
    """Dequantized ``weight [rows, K]`` after block quantization along K, per row: written
    from the scheme's definition (README "Precision"), independently of blockquant.py."""
    rows, k = weight.shape
    padded = np.zeros((rows, -(-k // block_size) * block_size), np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(rows, -1, block_size)
    top = 2**bits - 1
    if symmetric:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
        scale = (extreme / np.float32(-(2 ** (bits - 1)))).astype(np.float32)
        zero = np.full(scale.shape, 2 ** (bits - 1), np.float32)
    else:
        low = np.minimum(blocks.min(-1), 0).astype(np.float32)
        high = np.maximum(blocks.max(-1), 0).astype(np.float32)
        scale = ((high - low) / np.float32(top)).astype(np.float32)
    scale[scale == 0] = 1
    if not symmetric:
        zero = np.clip(np.round(-low / scale), 0, top).astype(np.float32)
    levels = np.clip(
        np.round(blocks * (np.float32(1) / scale)[..., None]) + zero[..., None], 0, top
    )
    values = (levels - zero[..., None]).astype(np.float32) * scale[..., None]
    return values.reshape(rows, -1)[:, :k]


@pytest.mark.parametrize("precision, symmetric", [("int4", False), ("int4", True), ("int8", False)])
@pytest.mark.parametrize("model", ["llama", "llama-tied"])
def test_round_to_nearest_equals_numpy_forward_of_dequantized_weights(
    model, precision, symmetric, tmp_path
):
    config = MODELS[model]
    weights = checkpoints.write_checkpoint(tmp_path / "hf", config, seed=23)
    bits = int(precision[3:])
    held = {
        # every 2-D weight is a MatMul/Gemm weight [out, in] or a table [rows, C]: both
        # quantized per row along their second axis
        name: round_to_nearest(array, bits, symmetric=symmetric) if array.ndim == 2 else array
        for name, array in weights.items()
    }
    ids = np.array([PROMPT])
    mask = np.ones_like(ids)
    expected, _ = numpy_forward.forward(held, config, ids, mask, positions_for(mask, ids.shape[1]))
    for target in ("portable", "ort"):
        out = tmp_path / target
        export(
            tmp_path / "hf",
            out,
            target=target,
            precision=precision,
            symmetric=symmetric,
            dequantize_at_load=True,
            last_logits_only=False,
        )
        logits, _ = Decoder(out)(ids, mask)
        assert_close(logits, expected, 1e-4, f"{model} {target} {precision}")
        types = {i.data_type for i in quantized_initializers(load_graph(out).graph, bits)}
        # symmetric: levels − 2^(bits−1) stored signed, no zero points
        assert types == ({TP.INT4} if symmetric else {TP.UINT4, TP.UINT8} & BLOCK_TYPES[bits])


def gguf_export_pair(tmp_path, target):
    gguf_files = pytest.importorskip("gguf_files", reason="the gguf extra is not installed")
    config = checkpoints.LLAMA_TIED_WIDE
    weights = checkpoints.random_weights(config, seed=8)
    kinds = {  # every lossless block format, the tied table among them
        name: ("Q4_0", "Q4_1", "Q8_0")[i % 3]
        for i, name in enumerate(weights)
        if weights[name].ndim == 2
    }
    path = tmp_path / "m.gguf"
    gguf_files.write_gguf(path, config, weights, kinds)
    fp32, folded = tmp_path / f"{target}-fp32", tmp_path / f"{target}-int4"
    export(path, fp32, target=target, last_logits_only=False)
    export(
        path,
        folded,
        target=target,
        precision="int4",
        dequantize_at_load=True,
        last_logits_only=False,
    )
    return fp32, folded


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_lossless_gguf_blocks_give_the_fp32_export_logits(tmp_path, target):
    fp32, folded = gguf_export_pair(tmp_path, target)
    logits = logits_of(folded)
    assert_close(logits, logits_of(fp32), 1e-5, f"{target} int4 (GGUF blocks) vs fp32")
    graph = load_graph(folded).graph
    kinds = {i.data_type for i in graph.initializer}
    # Q4_0 (zero point 8) signed int4, Q4_1 uint4 plus offsets, Q8_0 int8; GGUF's float16
    # scales kept float16 (exact)
    assert {TP.INT4, TP.UINT4, TP.INT8, TP.FLOAT16} <= kinds
    assert any(i.name.endswith(".offsets") for i in graph.initializer)  # Q4_1 even on portable
    assert not {n.op_type for n in graph.node} & QUANTIZED_KERNELS
    if target == "portable":
        assert_close(logits_of(folded, "interpreter"), logits, 1e-5, "interpreter vs onnxruntime")


def optimized_graph(model_path, tmp_path, level):
    """The graph onnxruntime runs after its load-time optimizations at ``level``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(tmp_path / f"optimized-{int(level)}.onnx")
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath, load_external_data=False).graph


def chain_nodes(graph):
    """The weight-rebuilding nodes left: named ``{weight}.q4/...`` by the pass, or reading a
    block initializer (4-bit, int8, float16)."""
    blocks = {i.name for i in graph.initializer if i.data_type in BLOCK_TYPES[4] | {TP.INT8}}
    blocks |= {i.name for i in graph.initializer if i.data_type == TP.FLOAT16}
    return [
        n
        for n in graph.node
        if ".q4/" in n.name or ".q8/" in n.name or any(name in blocks for name in n.input)
    ]


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_onnxruntime_folds_every_chain_at_load(tmp_path, target):
    _, folded = gguf_export_pair(tmp_path, target)
    model = folded / "model.onnx"
    saved = load_graph(folded).graph
    assert chain_nodes(saved)  # the check sees the chains where they are
    unoptimized = optimized_graph(model, tmp_path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert len(chain_nodes(unoptimized)) == len(chain_nodes(saved))
    basic = optimized_graph(model, tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    assert chain_nodes(basic) == []
    assert not [i.name for i in basic.initializer if i.data_type in BLOCK_TYPES[4] | {TP.INT8}]
    weights = {i.name for i in basic.initializer if i.data_type == TP.FLOAT and len(i.dims) == 2}
    for node in basic.node:  # every projection and table reads a float32 initializer now
        if node.op_type in ("MatMul", "Gemm"):
            assert node.input[1] in weights, node
        if node.op_type == "Gather" and node.input[1] == "input_ids":
            assert node.input[0] in weights, node


def test_options_refuse_other_precisions_and_targets(tmp_path):
    for precision, target in (("fp32", "ort"), ("fp16", "portable"), ("int4", "functions")):
        with pytest.raises(ValueError, match="dequantize_at_load"):
            CompileOptions(target, precision, dequantize_at_load=True)
    checkpoints.write_checkpoint(tmp_path / "hf", checkpoints.LLAMA, seed=2)
    done = graphattn_cli("export", tmp_path / "hf", "-o", tmp_path / "out", "--dequantize-at-load")
    assert done.returncode == 1 and "dequantize_at_load" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def graphattn_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "graphattn", *map(str, args)], capture_output=True, text=True
    )


def test_cli_export_and_compile(tmp_path):
    checkpoints.write_checkpoint(tmp_path / "hf", checkpoints.LLAMA, seed=2)
    flags = ["--target", "portable", "--precision", "int4", "--dequantize-at-load"]
    for args in (
        ["export", tmp_path / "hf", "-o", tmp_path / "direct", "--quiet", *flags],
        ["export", tmp_path / "hf", "-o", tmp_path / "functions", "--target", "functions"],
        ["compile", tmp_path / "functions", "-o", tmp_path / "compiled", *flags],
    ):
        done = graphattn_cli(*args)
        assert done.returncode == 0, done.stderr
    ids = np.array([PROMPT])
    compiled, _ = Decoder(tmp_path / "compiled")(ids, np.ones_like(ids))
    direct, _ = Decoder(tmp_path / "direct")(ids, np.ones_like(ids))
    assert_close(compiled, direct.astype(np.float64), 1e-6, "compile vs export")
    for out in ("direct", "compiled"):
        assert quantized_initializers(load_graph(tmp_path / out).graph, 4)


# SmolLM2-135M-Instruct (the Q4_1 GGUF, see test_smollm2.py)
CHAT = "What is the capital of France?"
STEPS = 32


@pytest.fixture(scope="module")
def smollm2_folded(tmp_path_factory):
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    from graphattn.exporters.fetch import fetch

    out = tmp_path_factory.mktemp("smollm2-dal") / "onnx"
    export(fetch("smollm2-135m", quiet=True), out, precision="int4", dequantize_at_load=True)
    return out


def decode_speed(out_dir, prompt_ids, repeats=3):
    """Best greedy decode tokens/s of ``repeats`` runs (one warm-up run first)."""
    generator = Generator(out_dir, provider="cpu")
    runs = [
        generator.generate(prompt_ids, max_new_tokens=STEPS, use_eos=False)
        for _ in range(repeats + 1)
    ]
    return max(r.timings["decode_tokens_per_s"] for r in runs[1:])


@pytest.mark.slow
def test_smollm2_int4_tokens_equal_fp32(smollm2_folded, tmp_path_factory):
    fp32 = js_apps.smollm2_export(tmp_path_factory, "ort-fp32")
    reference = Generator(fp32, provider="cpu").generate(
        CHAT, chat=True, max_new_tokens=STEPS, use_eos=False
    )
    ours = Generator(smollm2_folded, provider="cpu").generate(
        CHAT, chat=True, max_new_tokens=STEPS, use_eos=False
    )
    assert ours.token_ids == reference.token_ids
    size = (smollm2_folded / "model.onnx.data").stat().st_size
    assert size < 150e6, size
    speeds = {
        name: decode_speed(out, reference.prompt_ids)
        for name, out in (("fp32", fp32), ("int4 dequantize-at-load", smollm2_folded))
    }
    sizes = {
        "fp32": (fp32 / "model.onnx.data").stat().st_size / 2**20,
        "int4 dequantize-at-load": size / 2**20,
    }
    print(json.dumps({"decode_tok_s": speeds, "data_MiB": sizes, "text": ours.text}))


@pytest.mark.slow
@pytest.mark.skipif(js_apps.browser_missing() is not None, reason=str(js_apps.browser_missing()))
def test_smollm2_int4_in_the_browser_equals_python(smollm2_folded, tmp_path_factory, tmp_path):
    expected = Generator(smollm2_folded, provider="cpu").generate(
        CHAT, chat=True, max_new_tokens=STEPS, use_eos=False
    )
    fp32 = js_apps.smollm2_export(tmp_path_factory, "ort-fp32")
    seen = {}
    for name, out in (("int4 dequantize-at-load", smollm2_folded), ("fp32", fp32)):
        with js_apps.serve(out) as base:
            url = js_apps.page_url(base, prompt=CHAT, max=STEPS, noeos=1)
            result = js_apps.drive(url, tmp_path, timeout=900)
        assert "error" not in result, result
        seen[name] = result
    print(
        json.dumps(
            {
                n: {k: r[k] for k in ("loadSeconds", "prefillTokS", "decodeTokS", "threads")}
                for n, r in seen.items()
            }
        )
    )
    result = seen["int4 dequantize-at-load"]
    assert result["promptIds"] == expected.prompt_ids
    assert result["ids"] == expected.token_ids
    assert result["ids"] == seen["fp32"]["ids"]
