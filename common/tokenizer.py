"""Offline tokenizers that behave as HF's do: raw UTF-8 bytes, or a checkpoint's tokenizer.json.

No torch here, so the scheduler loads a tokenizer without the model. Contract of `encode`:
with `add_special_tokens` it applies the tokenizer's own post-processor (tokenizer.json's,
or the one `tokenizer_config.json`'s `add_bos_token`/`add_eos_token` ask for), exactly as
HF's tokenizer `__call__` does; without it, only the text's own tokens (special tokens
written in the text, such as `<|im_start|>`, are still recognized). A rendered chat template
is encoded without them, as HF's `apply_chat_template` does.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

TOKENIZER_FILE = "tokenizer.json"
BYTES_FINGERPRINT = ""  # what Describe reports for a checkpoint without tokenizer.json


class TokenizerMismatch(ValueError):
    """A tokenizer that does not belong to the model it would serve."""


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def special_tokens(self) -> dict[str, str]:
        """`bos_token`, `eos_token`, ... as chat templates know them (strings)."""
        ...

    @property
    def fingerprint(self) -> str:
        """sha256 of tokenizer.json, or `BYTES_FINGERPRINT`."""
        ...

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Incomplete UTF-8 decodes to U+FFFD."""
        ...


class ByteTokenizer:
    """Ids 0..255 are bytes; then BOS and EOS. Needs no files, so tiny test models can talk."""

    BOS = 256
    EOS = 257

    @property
    def vocab_size(self) -> int:
        return self.EOS + 1

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def special_tokens(self) -> dict[str, str]:
        return {}

    @property
    def fingerprint(self) -> str:
        return BYTES_FINGERPRINT

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return [self.BOS] * add_special_tokens + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint folder's tokenizer.json, with the special tokens its tokenizer_config.json
    names."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        try:
            tokenizers = importlib.import_module("tokenizers")
        except ImportError as error:
            raise ImportError(
                f"{path} needs the `tokenizers` package (pip install tokenizers)"
            ) from error
        raw = path.read_bytes()
        self._fingerprint = hashlib.sha256(raw).hexdigest()
        self._tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        self._config = _read_json(folder / "tokenizer_config.json")
        self._special = {
            key: token
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (token := _token_text(self._config.get(key))) is not None
        }
        self._apply_bos_eos_flags(tokenizers)

    def _apply_bos_eos_flags(self, tokenizers: Any) -> None:
        """transformers rebuilds the post-processor when tokenizer_config.json sets
        `add_bos_token` or `add_eos_token` (Llama-style tokenizers): do the same."""
        if "add_bos_token" not in self._config and "add_eos_token" not in self._config:
            return
        single, pair, specials = "$A:0", "$B:1", []
        for flag, key in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
            token = self._special.get(key)
            if not self._config.get(flag) or token is None:
                continue
            token_id = self._tokenizer.token_to_id(token)
            if token_id is None:
                raise TokenizerMismatch(f"{key} {token!r} is not in {TOKENIZER_FILE}")
            specials.append((token, token_id))
            if key == "bos_token":
                single, pair = f"{token}:0 {single}", f"{token}:1 {pair}"
            else:
                single, pair = f"{single} {token}:0", f"{pair} {token}:1"
        self._tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
            single=single, pair=f"{single} {pair}", special_tokens=specials
        )

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def bos_id(self) -> int | None:
        token = self._special.get("bos_token")
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self._special)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_tokenizer(folder: str | Path | None) -> Tokenizer:
    """The folder's tokenizer.json if it has one, else bytes."""
    if folder is not None and (Path(folder) / TOKENIZER_FILE).is_file():
        return HFTokenizer(folder)
    return ByteTokenizer()


def tokenizer_fingerprint(folder: str | Path) -> str:
    """What `load_tokenizer(folder).fingerprint` is, without parsing the tokenizer."""
    path = Path(folder) / TOKENIZER_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else BYTES_FINGERPRINT


def check_fits(tokenizer: Tokenizer, *, vocab_size: int, fingerprint: str) -> None:
    """Refuses a tokenizer that is not the served model's: another tokenizer.json, or ids
    the model's vocabulary cannot take. Never degrades to bytes silently."""
    if tokenizer.fingerprint != fingerprint:
        theirs = fingerprint[:12] or "byte-level (no tokenizer.json)"
        mine = tokenizer.fingerprint[:12] or "byte-level (no tokenizer.json)"
        raise TokenizerMismatch(
            f"the tokenizer here is {mine}, the executor's checkpoint has {theirs}"
        )
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerMismatch(
            f"the tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary only "
            f"{vocab_size}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value: object) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class IncrementalDetokenizer:
    """Turns a token stream into text pieces, holding back bytes until they form characters.

    Re-decodes a short window (from the last emitted boundary) each time, as vLLM does, so
    it works for byte-level and BPE tokenizers alike, including merges that change spacing.
    Call `flush` at the end: it releases what is held back (broken bytes become U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """The text that became certain with this token (often "", mid-character)."""
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Whatever is held back, at the end of the stream."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :]
