"""Fixtures shared by test modules."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def transformers() -> Iterator[ModuleType]:
    """transformers, imported with the hub switched off: checkpoints are local folders."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        module = importlib.import_module("transformers")
        # huggingface_hub reads the variable at import; it may have been imported before us.
        patch.setattr(importlib.import_module("huggingface_hub.constants"), "HF_HUB_OFFLINE", True)
        yield module
