"""The torch view of a host arena (what the executor copies through): zero-copy, typed by
block shape, and keeping the mapping alive."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch

from common.shm.arena import SHM_DIR, HostArena
from services.executor.arena_view import arena_tensor

NUM_BLOCKS = 4


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"fastswitch-test-{uuid.uuid4().hex[:8]}-"
    yield prefix
    for path in SHM_DIR.glob(f"{prefix}*"):
        path.unlink()


def test_typed_views_of_two_mappings_share_memory(prefix: str) -> None:
    with (
        HostArena.local(NUM_BLOCKS, 2 * 4 * 16, prefix=prefix) as owner,
        HostArena.attach(owner.name) as attached,
    ):
        typed = arena_tensor(attached, torch.float16, (2, 4, 8))
        assert typed.shape == (NUM_BLOCKS, 2, 4, 8)
        typed[2, 1] = 1.5
        raw = arena_tensor(owner)
        assert raw.shape == (NUM_BLOCKS, 128)
        assert torch.equal(raw[2].view(torch.float16).view(2, 4, 8)[1], typed[2, 1])
        assert not raw[[0, 1, 3]].any()
        del typed, raw


def test_arena_tensor_rejects_a_block_shape_of_other_size(prefix: str) -> None:
    with (
        HostArena.local(NUM_BLOCKS, 128, prefix=prefix) as arena,
        pytest.raises(ValueError, match="not 128 bytes"),
    ):
        arena_tensor(arena, torch.float32, (2, 4, 8))


def test_a_tensor_keeps_the_mapping_open(prefix: str) -> None:
    arena = HostArena.local(NUM_BLOCKS, 128, prefix=prefix)
    row = arena_tensor(arena)[1]
    with pytest.raises(BufferError):
        arena.close()
    del row
    arena.close()
    arena.unlink()
    with pytest.raises(ValueError, match="closed"):
        arena_tensor(arena)
