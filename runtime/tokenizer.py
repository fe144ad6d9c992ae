"""Tokenizer adapter on the ``tokenizers`` library, with chat templates rendered by jinja2.

Reads ``tokenizer.json`` from an export directory; ``tokenizer_config.json`` (or
``chat_template.jinja``) supplies the chat template and special tokens when present.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    """The tokenizer files are missing or unusable."""


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """``encode(text) -> ids``, ``decode(ids) -> text``, ``chat(messages) -> prompt text``."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json (pass token ids instead)")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception
            raise TokenizerError(f"{path}: cannot load ({error})") from None
        config = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        self.chat_template: str | None = config.get("chat_template")
        template_path = directory / "chat_template.jinja"
        if template_path.is_file():
            self.chat_template = template_path.read_text(encoding="utf-8")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (the tokenizer's post-processor may add BOS)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self._tok.token_to_id(token)

    def chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render the chat template over ``[{"role": ..., "content": ...}]``."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template")

        def raise_exception(message: str):
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


class StreamDecoder:
    """Turns a growing list of ids into text pieces: each ``push`` returns the new text.

    Text ending in an incomplete character (U+FFFD from a partial UTF-8 byte sequence) is held
    back until the next id completes it; ``finish`` flushes whatever is left.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token: int) -> str:
        """Add one id; returns the text it completes (may be empty)."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece

    def finish(self) -> str:
        """Whatever text is still held back."""
        text = self.tokenizer.decode(self.ids)
        piece = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece
