"""Offline tokenizers: raw UTF-8 bytes by default, or the checkpoint's own tokenizer.json."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

from services.executor.model.config import ModelConfig


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str:
        """Special ids are dropped; incomplete UTF-8 decodes to U+FFFD."""
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
    def eos_ids(self) -> tuple[int, ...]:
        return (self.EOS,)

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        return [self.BOS] * add_bos + list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json; special ids come from the model config as HF does."""

    def __init__(self, path: Path, config: ModelConfig) -> None:
        try:
            tokenizers = importlib.import_module("tokenizers")
        except ImportError as error:
            raise ImportError(
                f"{path} needs the `tokenizers` package (pip install tokenizers)"
            ) from error
        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        self._bos_id = config.bos_token_id
        self._eos_ids = config.eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if add_bos and self._bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def load_tokenizer(folder: str | Path, config: ModelConfig) -> Tokenizer:
    """The folder's tokenizer.json if it has one, else bytes (the config must fit them)."""
    path = Path(folder) / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(path, config)
    tokenizer = ByteTokenizer()
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"no tokenizer.json in {folder}, and vocab_size {config.vocab_size} is too small "
            f"for the byte tokenizer's {tokenizer.vocab_size}"
        )
    return tokenizer


class IncrementalDetokenizer:
    """Turns a token stream into text pieces, holding back bytes until they form characters.

    Re-decodes a short window (from the last emitted boundary) each time, as vLLM does, so
    it works for byte-level and BPE tokenizers alike, including merges that change spacing.
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
        """Whatever is held back, at the end of the stream (broken bytes become U+FFFD)."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :]
