"""Tokenizers and streaming detokenization, including characters split across tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.executor.model import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    ModelConfig,
    Tokenizer,
    load_tokenizer,
)
from tools.make_tiny_checkpoint import make_tiny_checkpoint

TEXT = "héllo, 世界 🎉!"


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


def test_bytes_round_trip_with_special_ids() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(TEXT)
    assert ids[0] == tokenizer.bos_id
    assert len(ids) == 1 + len(TEXT.encode())
    assert tokenizer.decode([*ids, *tokenizer.eos_ids]) == TEXT
    assert tokenizer.encode("a", add_bos=False) == [97]


def test_streaming_holds_back_partial_characters() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("a🎉b", add_bos=False)  # the emoji is 4 bytes
    pieces = stream(tokenizer, ids)
    assert pieces == ["a", "", "", "", "🎉", "b", ""]
    assert "".join(stream(tokenizer, tokenizer.encode(TEXT))) == TEXT


def test_flush_releases_a_truncated_character_as_replacement() -> None:
    tokenizer = ByteTokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in [104, *"世".encode()[:2]]]
    assert pieces == ["h", "", ""]
    assert detokenizer.flush() == "\ufffd"


def test_invalid_bytes_do_not_stall_the_stream() -> None:
    tokenizer = ByteTokenizer()
    assert "".join(stream(tokenizer, [0xFF, 0x61])) == "\ufffda"


def test_checkpoint_without_tokenizer_json_uses_bytes(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, num_layers=1, hidden=32, heads=2, kv_heads=1)
    config = ModelConfig.from_file(folder / "config.json")
    tokenizer = load_tokenizer(folder, config)
    assert isinstance(tokenizer, ByteTokenizer)
    assert config.vocab_size >= tokenizer.vocab_size
    assert config.eos_token_ids == tokenizer.eos_ids
    small = ModelConfig.from_hf(config.to_hf() | {"vocab_size": 200})
    with pytest.raises(ValueError, match="too small"):
        load_tokenizer(folder, small)


def write_word_tokenizer(folder: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "世界": 5}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))


def test_tokenizer_json_is_used_when_present(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, num_layers=1, hidden=32, heads=2, kv_heads=1)
    write_word_tokenizer(folder)
    config = ModelConfig.from_hf(
        ModelConfig.from_file(folder / "config.json").to_hf()
        | {"bos_token_id": 1, "eos_token_id": 2}
    )
    tokenizer = load_tokenizer(folder, config)
    assert isinstance(tokenizer, HFTokenizer)
    ids = tokenizer.encode("hello 世界")
    assert ids == [1, 3, 5]
    assert tokenizer.eos_ids == (2,)
    assert tokenizer.decode([*ids, 2]) == "hello 世界"
    assert "".join(stream(tokenizer, [*ids, 4])) == "hello 世界 world"


def test_missing_tokenizers_package_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_tiny_checkpoint(tmp_path, num_layers=1, hidden=32, heads=2, kv_heads=1)
    (folder / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    config = ModelConfig.from_file(folder / "config.json")
    with pytest.raises(ImportError, match="needs the `tokenizers` package"):
        load_tokenizer(folder, config)
