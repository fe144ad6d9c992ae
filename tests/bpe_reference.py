"""An independent byte-level BPE encoder (GPT-2 style), written from the algorithm: used to
check the tokenizer we build from GGUF metadata. Needs the ``regex`` package for \\p{...}.

Pre-tokenizers (``pre``): ``gpt2`` (the default), ``smollm`` (digits alone first), and
``llama-bpe`` / ``qwen2``, split as llama.cpp's llama-vocab.cpp does (its hand-expanded
spelling of the regexes, ``'[sS]`` for ``(?i:'s)``): Llama-3 keeps runs of up to three
digits, Qwen2 one digit; ``ignore_merges`` takes a word found whole in the vocabulary as one
token (llama.cpp sets it for Llama-3)."""

import regex

GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {
    "llama-bpe": regex.compile(_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _REST),
    "qwen2": regex.compile(_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _REST),
}


def byte_alphabet() -> dict[int, str]:
    """Each byte → a printable character (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


class ByteBPE:
    def __init__(self, tokens, merges, specials, pre="gpt2", ignore_merges=False):
        self.ignore_merges = ignore_merges
        self.ids = {token: index for index, token in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): rank for rank, m in enumerate(merges)}
        self.specials = sorted(specials, key=len, reverse=True)
        self.pre = pre
        self.alphabet = byte_alphabet()

    def _word(self, word: str) -> list[int]:
        symbols = [self.alphabet[b] for b in word.encode("utf-8")]
        if self.ignore_merges and "".join(symbols) in self.ids:
            return [self.ids["".join(symbols)]]
        while len(symbols) > 1:
            pairs = [
                (self.ranks.get((a, b), float("inf")), i)
                for i, (a, b) in enumerate(zip(symbols, symbols[1:]))
            ]
            best_rank, _ = min(pairs)
            if best_rank == float("inf"):
                break
            pair = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == best_rank)
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self.ids[s] for s in symbols]

    def _pieces(self, text: str) -> list[str]:
        if self.pre in SPLITS:
            return SPLITS[self.pre].findall(text)
        chunks = regex.split(r"(\p{N})", text) if self.pre == "smollm" else [text]
        pieces = []
        for chunk in chunks:
            if chunk:
                pieces.extend(GPT2_SPLIT.findall(chunk))
        return pieces

    def encode(self, text: str) -> list[int]:
        ids = []
        if self.specials:
            pattern = "(" + "|".join(regex.escape(s) for s in self.specials) + ")"
            parts = regex.split(pattern, text)
        else:
            parts = [text]
        for part in parts:
            if part in self.specials:
                ids.append(self.ids[part])
            elif part:
                for piece in self._pieces(part):
                    ids.extend(self._word(piece))
        return ids


class SentencePieceBPE:
    """SentencePiece-style BPE, written from the algorithm: spaces become "▁" (one prepended
    to each text run when ``add_space_prefix``), then adjacent symbols are merged greedily,
    each step taking the pair whose concatenation is the highest-scoring normal piece (the
    leftmost on a tie); a symbol left outside the vocabulary becomes its UTF-8 bytes as
    ``<0xNN>`` tokens. Control tokens in the text are matched first, as they are."""

    def __init__(self, tokens, scores, types, add_space_prefix=True, bos=None):
        self.ids = {token: index for index, token in enumerate(tokens)}
        self.scores = {
            token: score for token, score, kind in zip(tokens, scores, types) if kind == 1
        }
        self.specials = sorted(
            (t for t, kind in zip(tokens, types) if kind in (3, 4)), key=len, reverse=True
        )
        self.add_space_prefix, self.bos = add_space_prefix, bos

    def _run(self, text: str) -> list[int]:
        text = ("▁" if self.add_space_prefix else "") + text.replace(" ", "▁")
        symbols = list(text)
        while True:
            best, where = None, None
            for i in range(len(symbols) - 1):
                score = self.scores.get(symbols[i] + symbols[i + 1])
                if score is not None and (best is None or score > best):
                    best, where = score, i
            if where is None:
                break
            symbols[where : where + 2] = [symbols[where] + symbols[where + 1]]
        ids = []
        for symbol in symbols:
            if symbol in self.ids:
                ids.append(self.ids[symbol])
            else:
                ids.extend(self.ids[f"<0x{byte:02X}>"] for byte in symbol.encode("utf-8"))
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [] if self.bos is None else [self.bos]
        if self.specials:
            pattern = "(" + "|".join(regex.escape(s) for s in self.specials) + ")"
            parts = regex.split(pattern, text)
        else:
            parts = [text]
        for part in parts:
            if part in self.specials:
                ids.append(self.ids[part])
            elif part:
                ids.extend(self._run(part))
        return ids
