"""Local stacks for process-level tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from services.launch import LocalStack, StackConfig


@contextmanager
def executor_and_stores(config: StackConfig) -> Iterator[LocalStack]:
    """The executor and KV store(s) of `config`, without a scheduler: each test starts its
    own (the `scheduler` fixture), so one slow model load serves a whole module."""
    stack = LocalStack(config)
    try:
        stack.start(scheduler=False)
        yield stack
    finally:
        stack.stop()
