"""Tokenizers and streaming detokenization, including characters split across tokens, and the
real checkpoint's tokenizer and chat template against HF transformers'."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from common.chat_template import ChatTemplate, ChatTemplateError, Message, find_template
from common.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerMismatch,
    check_fits,
    load_tokenizer,
    tokenizer_fingerprint,
)
from services.executor.model.tiny_checkpoint import make_tiny_checkpoint

TEXT = "héllo, 世界 🎉!"


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


def test_bytes_round_trip_with_special_ids() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(TEXT)
    assert ids[0] == tokenizer.bos_id
    assert len(ids) == 1 + len(TEXT.encode())
    assert tokenizer.decode([*ids, ByteTokenizer.EOS]) == TEXT
    assert tokenizer.encode("a", add_special_tokens=False) == [97]


def test_streaming_holds_back_partial_characters() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("a🎉b", add_special_tokens=False)  # the emoji is 4 bytes
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
    tokenizer = load_tokenizer(folder)
    assert isinstance(tokenizer, ByteTokenizer)
    assert tokenizer_fingerprint(folder) == tokenizer.fingerprint == ""
    check_fits(tokenizer, vocab_size=264, fingerprint="")
    with pytest.raises(TokenizerMismatch, match="vocabulary only 200"):
        check_fits(tokenizer, vocab_size=200, fingerprint="")
    with pytest.raises(TokenizerMismatch, match="byte-level"):
        check_fits(tokenizer, vocab_size=264, fingerprint="ab" * 32)
    template = ChatTemplate(find_template(folder), tokenizer.special_tokens)
    rendered = template.render([Message("user", "hi")], add_generation_prompt=True)
    assert rendered == "user: hi\nassistant: "


def write_word_tokenizer(folder: Path, config: dict | None = None) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "世界": 5}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_tokenizer_json_is_used_when_present(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, num_layers=1, hidden=32, heads=2, kv_heads=1)
    write_word_tokenizer(folder, {"bos_token": "<s>", "eos_token": "</s>"})
    tokenizer = load_tokenizer(folder)
    assert isinstance(tokenizer, HFTokenizer)
    ids = tokenizer.encode("hello 世界")
    assert ids == [3, 5]  # the tokenizer.json post-processor adds nothing, so neither do we
    assert tokenizer.bos_id == 1
    assert tokenizer.decode([*ids, 2]) == "hello 世界"
    assert tokenizer.decode([*ids, 2], skip_special_tokens=False) == "hello 世界 </s>"
    assert "".join(stream(tokenizer, [*ids, 4])) == "hello 世界 world"
    assert tokenizer.fingerprint == tokenizer_fingerprint(folder)
    with pytest.raises(TokenizerMismatch, match="the executor's checkpoint has"):
        check_fits(tokenizer, vocab_size=264, fingerprint="")


def test_add_bos_token_in_tokenizer_config_is_honoured(tmp_path: Path) -> None:
    folder = make_tiny_checkpoint(tmp_path, num_layers=1, hidden=32, heads=2, kv_heads=1)
    write_word_tokenizer(folder, {"bos_token": "<s>", "eos_token": "</s>",
                                  "add_bos_token": True, "add_eos_token": False})
    tokenizer = load_tokenizer(folder)
    assert tokenizer.encode("hello world") == [1, 3, 4]
    assert tokenizer.encode("hello world", add_special_tokens=False) == [3, 4]


def test_missing_tokenizers_package_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_tiny_checkpoint(tmp_path, num_layers=1, hidden=32, heads=2, kv_heads=1)
    (folder / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="needs the `tokenizers` package"):
        load_tokenizer(folder)


def test_chat_template_refuses_bad_roles_and_raise_exception() -> None:
    template = ChatTemplate(
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('no') }}{% endif %}"
        "{{ messages | tojson }}", {})
    assert template.render([Message("user", "é<")], add_generation_prompt=False) == (
        '[{"role": "user", "content": "é<"}]')
    with pytest.raises(ChatTemplateError, match="refused"):
        template.render([Message("assistant", "x")], add_generation_prompt=False)
    with pytest.raises(ChatTemplateError, match=r"messages\[0\].role 'tool'"):
        template.render([Message("tool", "x")], add_generation_prompt=False)


# ---- the real checkpoint against HF transformers ------------------------------------------

REAL_TEXTS = [
    "Hello world", TEXT, "  leading spaces\tand tabs\n\n", "<|im_start|>user\nHi<|im_end|>",
    "Ünïcödé: ñ, 日本語, Ελληνικά, emoji 👩‍👩‍👧",
]


def test_real_tokenizer_matches_hf(smollm2: Path, hf_tokenizer) -> None:
    tokenizer = load_tokenizer(smollm2)
    assert tokenizer.vocab_size == len(hf_tokenizer)
    assert tokenizer.bos_id == hf_tokenizer.bos_token_id
    for text in REAL_TEXTS:
        theirs = hf_tokenizer(text)["input_ids"]  # add_special_tokens=True, HF's default
        assert tokenizer.encode(text) == theirs, text
        assert tokenizer.decode(theirs) == hf_tokenizer.decode(theirs, skip_special_tokens=True)
        assert "".join(stream(tokenizer, theirs)) == tokenizer.decode(theirs)


def test_real_chat_template_matches_hf(smollm2: Path, hf_tokenizer) -> None:
    tokenizer = load_tokenizer(smollm2)
    template = ChatTemplate(find_template(smollm2), tokenizer.special_tokens)
    chats = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be terse. Ünïcode ✓"},
         {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Another?"}],
    ]
    for chat in chats:
        for gen_prompt in (True, False):
            ours = template.render([Message(**m) for m in chat], add_generation_prompt=gen_prompt)
            theirs = hf_tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen_prompt)
            assert ours == theirs
            ids = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=gen_prompt)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert tokenizer.encode(ours, add_special_tokens=False) == list(ids)
