"""Fuzz targets for the code that reads untrusted input: GGUF files, safetensors headers and the
``config.json`` → architecture mapping.

A target turns one input (bytes) into calls of the code under test. :func:`check` runs it and
returns a :class:`Finding` unless the input either loads or raises the target's own error type
with a one-line message, within :data:`TIME_LIMIT_S`, with a tracemalloc peak inside the target's
memory budget (a small multiple of the input's size plus a constant), and with every array it
returns lying inside the file. The engines in ``scripts/fuzz.py`` feed the targets: atheris
(libFuzzer, coverage-guided) where it is installed, else :func:`random_loop`, a seeded mutation
loop (bit flips, truncations, length/count/offset field edits, JSON edits) — the same mutators
also serve atheris as its custom mutator, half of the time.

The inputs of the config target are decisions (:class:`Provider` reads them front to back), not
JSON text: they pick a tiny test config, edit its keys with values of the wrong type, negatives,
huge ints, NaN, lists and dicts, and sometimes damage the JSON text itself.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import checkpoints
import gguf  # noqa: F401 - imported here, not on the first input (gguf_format imports it lazily)
import numpy as np

from graphattn.exporters.checkpoint import open_checkpoint
from graphattn.exporters.gguf_format import GGUFFormatError, read_gguf
from graphattn.exporters.gguf_reader import GGUFCheckpoint
from graphattn.exporters.safetensors_reader import CheckpointError, load_float32, read_header

try:  # imported now, not on the first input; models/ may be mid-rewrite: fail only its target
    from graphattn.models import architecture_for
except Exception as error:  # any failure, kept for the config target
    _MODELS_IMPORT_ERROR: Exception | None = error
else:
    _MODELS_IMPORT_ERROR = None

TIME_LIMIT_S = 2.0  # per input
REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class ReadBeyondFileError(AssertionError):
    """A parsed tensor (or the array returned for it) reaches outside the file's bytes."""


class ContractError(AssertionError):
    """A call returned something other than what it promises (dtype, shape)."""


class HarnessError(AssertionError):
    """The harness itself failed on an input (reported as a finding, never allowed)."""


class InputTimeout(BaseException):
    """Raised by the per-input alarm; a BaseException so that no ``except Exception`` eats it."""


# ---------------------------------------------------------------------------------------------
# findings


@dataclass(frozen=True)
class Finding:
    """One input that broke a rule: ``kind`` is exception, message, timeout, memory or bounds."""

    target: str
    kind: str
    error: str  # exception type name ("" when none was raised)
    message: str
    where: str  # innermost repository frame of the exception, "file:line in function"
    data: bytes
    seconds: float
    peak_bytes: int

    @property
    def signature(self) -> str:
        """What identifies the same bug across inputs: kind, error type and place (a timeout's
        place is wherever the alarm struck, so timeouts and memory excesses group by kind)."""
        if self.kind in ("timeout", "memory"):
            return f"{self.target}|{self.kind}"
        return f"{self.target}|{self.kind}|{self.error}|{self.where}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; the input as hex."""
        return {
            "target": self.target,
            "kind": self.kind,
            "error": self.error,
            "message": self.message,
            "where": self.where,
            "seconds": round(self.seconds, 3),
            "peak_bytes": self.peak_bytes,
            "size": len(self.data),
            "input_hex": self.data.hex(),
        }


def _where(error: BaseException) -> str:
    """``file:line in function`` of the innermost traceback frame in this repository."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code is not _EXPIRED_CODE:  # the alarm's handler: report where it interrupted
            frames.append((code.co_filename, tb.tb_lineno, code.co_name))
        tb = tb.tb_next
    ours = [f for f in frames if f[0].startswith(str(REPO)) and "/.venv/" not in f[0]]
    if not (ours or frames):
        return "?"
    filename, line, function = (ours or frames)[-1]
    path = Path(filename)
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    return f"{shown}:{line} in {function}"


# ---------------------------------------------------------------------------------------------
# the per-input check


class Scratch:
    """A directory for the file each input is written to; one input file exists at a time.

    Every input gets a new file name (the previous one is unlinked, never truncated) so that a
    memory map still held on an old input can never see its pages vanish (SIGBUS).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._current: Path | None = None

    def input_file(self, data: bytes, suffix: str) -> Path:
        """Write ``data`` to a fresh ``input-<n><suffix>`` and return its path."""
        if self._current is not None:
            self._current.unlink(missing_ok=True)
        self._count += 1
        self._current = self.root / f"input-{self._count}{suffix}"
        self._current.write_bytes(data)
        return self._current


def _expired(signum: int, frame: object) -> None:
    raise InputTimeout("input ran past its time limit")


_EXPIRED_CODE = _expired.__code__


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise InputTimeout in the main thread after ``seconds`` (Python code only)."""
    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check(
    target: Target, data: bytes, scratch: Scratch, time_limit: float = TIME_LIMIT_S
) -> Finding | None:
    """Run ``target`` on ``data``; None when it loaded or failed properly, else the Finding."""
    if not tracemalloc.is_tracing():
        tracemalloc.start(1)
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    error: BaseException | None = None
    start = time.perf_counter()
    try:
        with _alarm(time_limit):
            target.execute(data, scratch)
    except (Exception, InputTimeout) as raised:  # classifying them is the point
        error = raised
    seconds = time.perf_counter() - start
    peak = max(0, tracemalloc.get_traced_memory()[1] - before)
    kind, name, message, where = "", "", "", ""
    if error is not None:
        name, message = type(error).__name__, str(error)
        if isinstance(error, InputTimeout):
            kind = "timeout"
        elif isinstance(error, ReadBeyondFileError):
            kind = "bounds"
        elif not isinstance(error, target.allowed) or isinstance(error, ContractError):
            kind = "exception"
        elif "\n" in message or not message.strip():
            kind = "message"
        if kind:
            where = _where(error)
        error.__traceback__ = None  # drop the frames (and the memory maps they hold) now
    if not kind and peak > target.memory_budget(len(data)):
        kind = "memory"
        message = message or f"peak {peak} bytes > budget {target.memory_budget(len(data))}"
    if not kind and seconds > time_limit:
        kind, message = "timeout", message or f"took {seconds:.2f} s"
    del error
    if not kind:
        return None
    return Finding(target.name, kind, name, message[:500], where, data, seconds, peak)


# ---------------------------------------------------------------------------------------------
# decisions and values


class Provider:
    """Decisions drawn from an input's bytes, front to back; zeros once the bytes run out.

    It plays the part of atheris.FuzzedDataProvider, but is ours so that the same bytes give
    the same config with or without atheris (and in the seeded fallback loop).
    """

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def int_in_range(self, low: int, high: int) -> int:
        """An int in [low, high], from as many bytes as the span needs."""
        span = high - low + 1
        width = max(1, ((span - 1).bit_length() + 7) // 8)
        chunk = self.data[self.pos : self.pos + width]
        self.pos += width
        return low + int.from_bytes(chunk, "big") % span

    def pick(self, items: Sequence[T]) -> T:
        """One of ``items``."""
        return items[self.int_in_range(0, len(items) - 1)]


class RandomChooser:
    """The Provider interface over a seeded ``random.Random`` (for the mutators)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int_in_range(self, low: int, high: int) -> int:
        """An int in [low, high]."""
        return self.rng.randint(low, high)

    def pick(self, items: Sequence[T]) -> T:
        """One of ``items``."""
        return self.rng.choice(items)


Chooser = Provider | RandomChooser

INTERESTING = (
    *(0, 1, 2, 3, 4, 7, 8, 16, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 1024, 4096),
    *(2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**60, 2**62),
    *(2**63 - 1, 2**63, 2**64 - 1),
)
WORDS = (
    *("", "llama", "mistral", "qwen2", "gpt2", "silu", "gelu_new", "gelu", "linear", "llama3"),
    *("default", "dynamic", "yarn", "F32", "F16", "BF16", "I64", "U8", "BOOL", "Q4_0", "1"),
    *("-1", "NaN", "null", "é", "\u0000", "x" * 300, "LlamaForCausalLM", "GPT2LMHeadModel"),
)
ROPE_KEYS = (
    *("type", "rope_type", "factor", "low_freq_factor", "high_freq_factor", "rope_theta"),
    *("original_max_position_embeddings", "partial_rotary_factor", "beta_fast", "beta_slow"),
)


def json_value(choose: Chooser, old: object = None, depth: int = 0) -> object:
    """A JSON value for a field that held ``old``: wrong types, edge numbers, containers."""
    value = _json_value(choose, old, depth)
    if type(value) is int and value.bit_length() > 13_000:  # json.dumps: ≤ 4,300 digits
        return 10**4000 if value > 0 else -(10**4000)
    return value


def _json_value(choose: Chooser, old: object, depth: int) -> object:
    kinds = 16 if depth < 2 else 11
    kind = choose.int_in_range(0, kinds - 1)
    if kind == 0:
        return choose.pick(INTERESTING)
    if kind == 1:
        return -choose.pick(INTERESTING)
    if kind == 2:
        return choose.pick((2**100, -(2**100), 10**4000, 2**64 + 1))
    if kind == 3:
        return choose.pick((0.0, -0.0, 0.5, 1.5, -2.5, 1e-30, 1e308, 3.0, 2.0**63))
    if kind == 4:
        return choose.pick((math.nan, math.inf, -math.inf))
    if kind == 5:
        return choose.pick(WORDS)
    if kind == 6:
        return bool(choose.int_in_range(0, 1))
    if kind == 7:
        return None
    if kind == 8:
        return str(old)
    if kind in (9, 10):  # a near miss of the old value
        if isinstance(old, bool) or old is None:
            return not old
        if isinstance(old, int):
            return choose.pick((old + 1, old - 1, old * 2, -old, old // 2, old * 1000, old**3))
        if isinstance(old, float):
            return choose.pick((old * 2, -old, old + 0.5, int(old) if math.isfinite(old) else 0))
        if isinstance(old, str):
            return choose.pick((old + "x", old.upper(), old[:1], old * 2))
        if isinstance(old, list):
            return choose.pick((old + old, old[:1], [], [old], [json_value(choose, None, 2)]))
        if isinstance(old, dict) and old:
            edited = dict(old)
            key = choose.pick(sorted(edited))
            edited[key] = json_value(choose, edited[key], depth + 1)
            return edited
        return old
    if kind in (11, 12):
        count = choose.int_in_range(0, 3)
        return [json_value(choose, old, depth + 1) for _ in range(count)]
    if kind in (13, 14):
        keys = [choose.pick(ROPE_KEYS) for _ in range(choose.int_in_range(0, 4))]
        return {key: json_value(choose, None, depth + 1) for key in keys}
    return [old]


def raw_json_edit(choose: Chooser, text: bytes) -> bytes:
    """Damage JSON text: truncation, deep nesting, a 5,000-digit number, bad UTF-8, a BOM."""
    kind = choose.int_in_range(0, 6)
    cut = choose.int_in_range(0, len(text))
    if kind == 0:
        return text[:cut]
    if kind == 1:
        depth = choose.pick((64, 1000, 20000, 200000))
        return text[:cut] + b"[" * depth + b"]" * depth + text[cut:]
    if kind == 2:
        digits = choose.pick((4300, 5000, 100000))
        return text.rstrip()[:-1] + b', "zz": ' + b"9" * digits + b"}"
    if kind == 3:
        return text[:cut] + choose.pick((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00")) + text[cut:]
    if kind == 4:
        return b"\xef\xbb\xbf" + text
    if kind == 5:
        return choose.pick((b"[]", b"null", b"1", b'"x"', b"", b"{}", b"NaN"))
    return text.replace(b'"', b"'", 1)


# ---------------------------------------------------------------------------------------------
# byte mutators


def _interesting_int(rng: random.Random, old: int, size: int) -> int:
    options = (old + 1, old - 1, old * 2, old // 2, old + 2**32, size, size + 1, size - 1)
    return rng.choice(options + INTERESTING) if rng.random() < 0.3 else rng.choice(INTERESTING)


def mutate_bytes(
    data: bytes,
    rng: random.Random,
    max_size: int,
    fields: Sequence[tuple[int, int]] = (),
    others: Sequence[bytes] = (),
) -> bytes:
    """1–4 stacked edits: bit flips, byte sets, int field edits (at ``fields`` when given,
    (position, width)), truncation, chunk delete/insert/copy, splicing with ``others``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(11)
        if op in (0, 1) and buf:
            i = rng.randrange(len(buf))
            if op == 0:
                buf[i] ^= 1 << rng.randrange(8)
            else:
                buf[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op in (2, 3, 4):
            if fields and op != 4:
                pos, width = rng.choice(fields)
            else:
                width = rng.choice((1, 2, 4, 8))
                pos = rng.randrange(len(buf) + 1)
            if pos + width > len(buf):
                continue
            old = int.from_bytes(buf[pos : pos + width], "little")
            if op == 3:
                value = old + rng.choice((-1, 1)) * rng.randint(1, 64)
            else:
                value = _interesting_int(rng, old, len(buf))
            buf[pos : pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif op == 5:
            del buf[rng.randrange(len(buf) + 1) :]
        elif op == 6 and buf:
            start = rng.randrange(len(buf))
            del buf[start : start + rng.randint(1, 64)]
        elif op == 7:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 8 and buf:
            start = rng.randrange(len(buf))
            chunk = buf[start : start + rng.randint(1, 256)]
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = chunk
        elif op == 9 and others:
            other = rng.choice(others)
            buf = buf[: rng.randrange(len(buf) + 1)] + other[rng.randrange(len(other) + 1) :]
        elif op == 10 and buf:
            i = rng.randrange(len(buf))
            buf[i : i + 1] = bytes([buf[i]]) * rng.choice((2, 16, 1000))
    return bytes(buf[:max_size])


_GGUF_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_fields(data: bytes) -> list[tuple[int, int]]:
    """(position, width) of the header's ints — version, counts, lengths, value types, array
    counts, dims, sizes, tensor types and offsets — as far as ``data`` can be walked."""
    found: list[tuple[int, int]] = []
    pos = 4

    def take(width: int, record: bool = True) -> int:
        nonlocal pos
        if pos + width > len(data):
            raise IndexError(pos)
        if record:
            found.append((pos, width))
        pos += width
        return int.from_bytes(data[pos - width : pos], "little")

    def skip_string(record: bool = True) -> None:
        nonlocal pos
        pos += take(8, record)

    def value(kind: int, depth: int, record: bool) -> None:
        if kind in _GGUF_WIDTHS:
            take(_GGUF_WIDTHS[kind], record)
        elif kind == 8:
            skip_string(record)
        elif kind == 9 and depth < 4:
            element, count = take(4, record), take(8, record)
            for i in range(min(count, len(data))):
                value(element, depth + 1, record and i < 4)
        else:
            raise ValueError(kind)

    if data[:4] != b"GGUF":
        return found
    try:
        take(4)
        tensors, kvs = take(8), take(8)
        for _ in range(min(kvs, len(data))):
            skip_string()
            value(take(4), 0, True)
        for _ in range(min(tensors, len(data))):
            skip_string()
            dims = take(4)
            if dims > 8:
                break
            for _ in range(dims):
                take(8)
            take(4)
            take(8)
    except (IndexError, ValueError):
        pass
    return found


def mutate_gguf(data: bytes, rng: random.Random, max_size: int, others: Sequence[bytes]) -> bytes:
    """Byte edits, mostly aimed at the header's int fields (counts, lengths, sizes, offsets)."""
    fields = gguf_fields(data) if rng.random() < 0.7 else ()
    return mutate_bytes(data, rng, max_size, fields, others)


def _split_safetensors(data: bytes) -> tuple[dict, bytes] | None:
    if len(data) < 8:
        return None
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + length])
    except (ValueError, RecursionError):
        return None
    return (header, data[8 + length :]) if isinstance(header, dict) else None


def mutate_safetensors(
    data: bytes, rng: random.Random, max_size: int, others: Sequence[bytes]
) -> bytes:
    """Half byte edits (the length prefix among the fields), half JSON-aware header edits."""
    parsed = _split_safetensors(data) if rng.random() < 0.6 else None
    if parsed is not None:
        try:
            return _mutate_header(*parsed, data, rng, max_size)
        except (ValueError, RecursionError):  # a header too odd to re-serialize
            pass
    return mutate_bytes(data, rng, max_size, [(0, 8), (0, 4)] * 3, others)


def _mutate_header(
    header: dict, tail: bytes, data: bytes, rng: random.Random, max_size: int
) -> bytes:
    """One edit of a parsed header (an entry's field, the entry, a copy, a deletion, the
    metadata), re-serialized; the length prefix right, mostly."""
    choose = RandomChooser(rng)
    names = [name for name in header if name != "__metadata__"]
    op = rng.randrange(6)
    if names and op <= 2:
        name = rng.choice(names)
        entry = header[name]
        if isinstance(entry, dict) and op < 2:
            key = rng.choice(("dtype", "shape", "data_offsets", "dtype", "shape", "data_offsets"))
            entry[key] = json_value(choose, entry.get(key))
        elif isinstance(entry, dict):
            for key in ("shape", "data_offsets"):
                if isinstance(entry.get(key), list) and entry[key]:
                    i = rng.randrange(len(entry[key]))
                    entry[key][i] = json_value(choose, entry[key][i])
        else:
            header[name] = json_value(choose, entry)
    elif op == 3 and names:
        source = header[rng.choice(names)]
        header[f"extra{rng.randrange(100)}"] = copy.deepcopy(source)
    elif op == 4 and names:
        del header[rng.choice(names)]
    else:
        header["__metadata__"] = json_value(choose, header.get("__metadata__"))
    text = json.dumps(header).encode()
    if rng.random() < 0.1:
        text = raw_json_edit(choose, text)
    text += b" " * (-len(text) % 8)
    length = len(text) if rng.random() < 0.85 else _interesting_int(rng, len(text), len(data))
    return (struct.pack("<Q", length % 2**64) + text + tail)[:max_size]


# ---------------------------------------------------------------------------------------------
# seeds

SEED_LLAMA = checkpoints.llama_variant(
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=8,
    max_position_embeddings=16,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=1,
)
SEED_KINDS = {  # every type gguf_format decodes, and Q5_0 through the gguf package
    "model.embed_tokens.weight": "Q8_0",
    "model.layers.0.self_attn.q_proj.weight": "Q4_0",
    "model.layers.0.self_attn.k_proj.weight": "Q4_1",
    "model.layers.0.self_attn.v_proj.weight": "F16",
    "model.layers.0.self_attn.o_proj.weight": "BF16",
    "model.layers.0.mlp.gate_proj.weight": "Q5_0",
    "model.layers.0.mlp.up_proj.weight": "Q4_1",
    "model.layers.0.mlp.down_proj.weight": "Q8_0",
}
SEED_TOKENIZER = {
    "model": {
        "vocab": {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "Ġ": 5, "Ġa": 6, "c": 7},
        "merges": ["a b", "Ġ a"],
    },
    "added_tokens": [
        {"id": 0, "content": "<s>", "special": True},
        {"id": 1, "content": "</s>", "special": True},
    ],
}


def gguf_seeds(directory: Path) -> list[bytes]:
    """Tiny GGUFs: two Llamas from tests/gguf_files.py (every tensor type, a tokenizer, tied and
    untied), one with every metadata value type and alignment 64, and an empty one."""
    import gguf_files
    from gguf import GGUFWriter

    directory.mkdir(parents=True, exist_ok=True)
    seeds = []
    weights = checkpoints.random_weights(SEED_LLAMA, seed=1)
    gguf_files.write_gguf(directory / "a.gguf", SEED_LLAMA, weights, SEED_KINDS, SEED_TOKENIZER)
    seeds.append((directory / "a.gguf").read_bytes())
    untied = {**SEED_LLAMA, "tie_word_embeddings": False}
    weights = checkpoints.random_weights(untied, seed=2)
    kinds = {name: ("Q4_0" if "norm" not in name else "F32") for name in weights}
    gguf_files.write_gguf(directory / "b.gguf", untied, weights, kinds)
    seeds.append((directory / "b.gguf").read_bytes())

    writer = GGUFWriter(str(directory / "c.gguf"), "llama")
    writer.add_custom_alignment(64)
    for key, add, value in (
        ("u8", writer.add_uint8, 200),
        ("i8", writer.add_int8, -100),
        ("u16", writer.add_uint16, 60000),
        ("i16", writer.add_int16, -3),
        ("u32", writer.add_uint32, 4000000000),
        ("i32", writer.add_int32, -7),
        ("f32", writer.add_float32, 0.5),
        ("u64", writer.add_uint64, 2**40),
        ("i64", writer.add_int64, -(2**40)),
        ("f64", writer.add_float64, 1e300),
        ("b", writer.add_bool, True),
        ("s", writer.add_string, "héllo"),
    ):
        add(f"x.{key}", value)
    writer.add_array("x.ints", [1, 2, 3])
    writer.add_array("x.strs", ["a", "", "ü"])
    writer.add_array("x.nested", [[1, 2], [3]])
    writer.add_tensor("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.add_tensor("b", np.arange(4, dtype=np.float16))
    writer.add_tensor("c", np.arange(5, dtype=np.int8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    seeds.append((directory / "c.gguf").read_bytes())
    seeds.append(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    return seeds


def safetensors_seeds(directory: Path) -> list[bytes]:
    """Tiny checkpoints from tests/checkpoints.py (F32, F16, BF16) and one file holding every
    dtype the reader knows, a scalar, an empty tensor and ``__metadata__``."""
    config = checkpoints.llama_variant(
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=4,
    )
    seeds = []
    for dtype in ("F32", "F16", "BF16"):
        checkpoints.write_checkpoint(directory / dtype, config, dtype=dtype)
        seeds.append((directory / dtype / "model.safetensors").read_bytes())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, array in (
        ("f64", np.arange(3, dtype=np.float64)),
        ("i64", np.arange(2, dtype=np.int64)),
        ("i32", np.arange(2, dtype=np.int32).reshape(1, 2)),
        ("i16", np.arange(2, dtype=np.int16)),
        ("i8", np.arange(3, dtype=np.int8)),
        ("u8", np.arange(3, dtype=np.uint8)),
        ("bool", np.array([True, False])),
        ("scalar", np.array(1.5, dtype=np.float32)),
        ("empty", np.zeros((0, 3), dtype=np.float32)),
    ):
        raw = array.tobytes()
        dtype = {"bool": "BOOL", "scalar": "F32", "empty": "F32"}.get(name, name.upper())
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    seeds.append(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return seeds


# ---------------------------------------------------------------------------------------------
# the config.json input

CONFIG_BASES = tuple(checkpoints.ALL_VARIANTS.values())
CONFIG_KEYS = (
    *("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size"),
    *("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"),
    *("max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling"),
    *("rope_parameters", "partial_rotary_factor", "hidden_act", "attention_bias"),
    *("sliding_window", "use_sliding_window", "tie_word_embeddings", "bos_token_id"),
    *("eos_token_id", "pad_token_id", "n_embd", "n_layer", "n_head", "n_positions", "n_inner"),
    *("layer_norm_epsilon", "activation_function", "layer_types", "mlp_bias", "torch_dtype"),
)


def config_json(data: bytes) -> bytes:
    """The config.json text an input stands for: a base test config, 0–4 key edits, and (when
    the last decision says so) damage to the JSON text. Empty input → the first base as is."""
    choose = Provider(data)
    config = copy.deepcopy(choose.pick(CONFIG_BASES))
    for _ in range(choose.int_in_range(0, 4)):
        key = choose.pick(sorted(set(config) | set(CONFIG_KEYS)))
        if choose.int_in_range(0, 7) == 7:
            config.pop(key, None)
        else:
            config[key] = json_value(choose, config.get(key))
    text = json.dumps(config).encode()
    if choose.int_in_range(0, 7) == 7:
        text = raw_json_edit(choose, text)
    return text


def config_seeds() -> list[bytes]:
    """Each base config unchanged, and each with one edit of each of its keys to a near miss."""
    seeds = [bytes([index]) for index in range(len(CONFIG_BASES))]
    keys = len(set(CONFIG_BASES[0]) | set(CONFIG_KEYS))
    seeds += [bytes([0, 1, k, 0, 9]) for k in range(0, keys, 3)]
    return seeds


# ---------------------------------------------------------------------------------------------
# targets


def _inside(name: str, offset: int, nbytes: int, size: int) -> None:
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        raise ReadBeyondFileError(f"tensor {name!r} [{offset}, {offset + nbytes}) vs {size} bytes")


def _touch(name: str, array: np.ndarray, nbytes: int, size: int) -> None:
    """Read every byte of ``array``; it must be no larger than the tensor and inside the file."""
    if array.nbytes > nbytes:
        raise ReadBeyondFileError(f"tensor {name!r}: array of {array.nbytes} bytes > {nbytes}")
    offset = getattr(array, "offset", None)
    if isinstance(offset, int):
        _inside(name, offset, array.nbytes, size)
    int(np.asarray(array).reshape(-1).view(np.uint8).sum())


def run_gguf(data: bytes, scratch: Scratch) -> None:
    """read_gguf, then every tensor's array mapped and read."""
    path = scratch.input_file(data, ".gguf")
    parsed = read_gguf(path)
    for info in parsed.tensors:
        _inside(info.name, info.offset, info.nbytes, len(data))
        _touch(info.name, parsed.array(info), info.nbytes, len(data))


def run_gguf_checkpoint(data: bytes, scratch: Scratch) -> None:
    """GGUFCheckpoint as a whole: config, names, every tensor loaded, the tokenizer written."""
    path = scratch.input_file(data, ".gguf")
    checkpoint = GGUFCheckpoint(path)
    for name in checkpoint.tensors:
        checkpoint.load(name)
    out = scratch.root / "tokenizer"
    out.mkdir(exist_ok=True)
    checkpoint.write_tokenizer(out)


def run_safetensors(data: bytes, scratch: Scratch) -> None:
    """read_header, then load_float32 of every entry (float32, of the entry's shape)."""
    path = scratch.input_file(data, ".safetensors")
    for entry in read_header(path).values():
        _inside(entry.name, entry.offset, entry.nbytes, len(data))
        if entry.offset < 8:
            raise ReadBeyondFileError(
                f"tensor {entry.name!r} starts at {entry.offset}, in the prefix"
            )
        array = load_float32(entry)
        if array.dtype != np.float32 or array.shape != tuple(entry.shape):
            raise ContractError(f"{entry.name}: {array.dtype}{array.shape} for {entry.shape}")


_CONFIG_TENSORS = {"x": np.zeros(1, dtype=np.float32)}


def run_config(data: bytes, scratch: Scratch) -> None:
    """The config.json that the input's decisions stand for, through :func:`run_config_text`."""
    scratch.input_file(data, ".bin")
    try:
        text = config_json(data)
    except Exception as error:  # our own bug, never an allowed ValueError of the code tested
        raise HarnessError(f"config_json failed: {type(error).__name__}: {error}") from None
    run_config_text(text, scratch)


def run_config_text(text: bytes, scratch: Scratch) -> None:
    """open_checkpoint on a folder with ``text`` as its config.json, then architecture_for →
    config_from_hf → weights (the mapping that an export starts with)."""
    if _MODELS_IMPORT_ERROR is not None:
        raise RuntimeError(f"graphattn.models does not import: {_MODELS_IMPORT_ERROR}")
    directory = scratch.root / "checkpoint"
    if not (directory / "model.safetensors").is_file():
        directory.mkdir(exist_ok=True)
        checkpoints.write_safetensors(directory / "model.safetensors", _CONFIG_TENSORS)
    (directory / "config.json").write_bytes(text)
    config = open_checkpoint(directory).config
    architecture = architecture_for(config)
    model_config = architecture.config_from_hf(config)
    architecture.weights(model_config)


@dataclass(frozen=True)
class Target:
    """A fuzz target: how to run one input, what may be raised, seeds, mutator, memory budget."""

    name: str
    execute: Callable[[bytes, Scratch], None]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[Path], list[bytes]]
    mutate: Callable[[bytes, random.Random, int, Sequence[bytes]], bytes]
    memory_factor: int  # the budget: factor × input bytes + constant
    memory_constant: int
    notes: str = ""
    max_len: int = field(default=1 << 16)

    def memory_budget(self, size: int) -> int:
        """The most bytes (tracemalloc peak) one input of ``size`` bytes may allocate."""
        return self.memory_factor * size + self.memory_constant


MIB = 1 << 20
TARGETS = {
    target.name: target
    for target in (
        Target(
            "gguf",
            run_gguf,
            (GGUFFormatError,),
            gguf_seeds,
            mutate_gguf,
            # metadata arrays become Python lists: an int8 is 1 byte in the file and 8 (pointer)
            # + 28 (int object) in the list; 64× covers that with room, and still refuses any
            # allocation that follows a size field instead of the bytes present
            memory_factor=64,
            memory_constant=MIB,
        ),
        Target(
            "gguf-checkpoint",
            run_gguf_checkpoint,
            (CheckpointError,),
            gguf_seeds,
            mutate_gguf,
            memory_factor=64,  # float32 of 4-bit blocks is 7× their bytes, plus temporaries
            memory_constant=16 * MIB,
        ),
        Target(
            "safetensors",
            run_safetensors,
            (CheckpointError,),
            safetensors_seeds,
            mutate_safetensors,
            memory_factor=64,  # JSON objects, and float32 of int8/bool data (4×)
            memory_constant=MIB,
        ),
        Target(
            "config",
            run_config,
            (ValueError,),  # CheckpointError is one
            lambda directory: config_seeds(),
            lambda data, rng, max_size, others: mutate_bytes(data, rng, max_size, (), others),
            memory_factor=0,
            memory_constant=64 * MIB,  # a tiny model's plan, whatever the config says
            max_len=256,
        ),
    )
}


# config.json text itself as the input: for regression tests of the config target's findings
CONFIG_TEXT = Target(
    "config-json",
    run_config_text,
    (ValueError,),
    lambda directory: [json.dumps(config).encode() for config in CONFIG_BASES],
    lambda data, rng, max_size, others: mutate_bytes(data, rng, max_size, (), others),
    memory_factor=64,
    memory_constant=64 * MIB,
)


# ---------------------------------------------------------------------------------------------
# the fallback engine


@dataclass
class LoopResult:
    """What one run of :func:`random_loop` did."""

    inputs: int
    seconds: float


def random_loop(
    target: Target,
    scratch: Scratch,
    seeds: Sequence[bytes],
    on_input: Callable[[bytes, Finding | None], None],
    *,
    seed: int,
    runs: int | None,
    seconds: float | None,
) -> LoopResult:
    """A seeded mutation loop (no coverage feedback): every seed, then mutants of a pool that
    starts as the seeds and keeps one mutant in 16, until ``runs`` inputs or ``seconds``."""
    rng = random.Random(seed)
    pool = list(seeds)
    start = time.perf_counter()
    count = 0
    while True:
        if runs is not None and count >= runs:
            break
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
        if count < len(seeds):
            data = seeds[count]
        else:
            data = target.mutate(rng.choice(pool), rng, target.max_len, seeds)
            if rng.random() < 1 / 16:
                if len(pool) < 256:
                    pool.append(data)
                else:
                    pool[rng.randrange(len(seeds), 256)] = data
        on_input(data, check(target, data, scratch))
        count += 1
    return LoopResult(count, time.perf_counter() - start)
