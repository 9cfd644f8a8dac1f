"""The host arena: shared between processes by name, unlinked only by its owner or as
stale, allocated up front, and never unmapped under a live view."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from common.shm import arena as arena_module
from common.shm.arena import SHM_DIR, HostArena, cleanup_stale

NUM_BLOCKS = 4
BLOCK_BYTES = 3 * 4096 + 64  # not a page multiple: offsets must not assume one


def _pattern(block: int) -> bytes:
    return random.Random(block).randbytes(BLOCK_BYTES)


def _span(block: int) -> slice:
    return slice(block * BLOCK_BYTES, (block + 1) * BLOCK_BYTES)


def _segments(prefix: str) -> list[str]:
    return sorted(path.name for path in SHM_DIR.glob(f"{prefix}*"))


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"fastswitch-test-{uuid.uuid4().hex[:8]}-"
    yield prefix
    for name in _segments(prefix):
        (SHM_DIR / name).unlink()


def _write_blocks(name: str, blocks: list[int]) -> None:
    arena = HostArena.attach(name)
    with arena.view() as view:
        for block in blocks:
            view[_span(block)] = _pattern(block)
    arena.close()


def _create_and_hang(name: str, ready: Connection) -> None:
    HostArena.create(name, NUM_BLOCKS, BLOCK_BYTES)
    ready.send(name)
    signal.pause()  # until killed


def test_blocks_written_by_another_process_read_back_bit_identical(prefix: str) -> None:
    with HostArena.local(NUM_BLOCKS, BLOCK_BYTES, prefix=prefix) as arena:
        child = mp.get_context("spawn").Process(target=_write_blocks, args=(arena.name, [1, 3]))
        child.start()
        child.join(60)
        assert child.exitcode == 0

        with arena.view() as view:
            assert view[_span(1)] == _pattern(1)
            assert view[_span(3)] == _pattern(3)
            assert view[_span(0)] == view[_span(2)] == bytes(BLOCK_BYTES)
        # The attacher exiting must not have unlinked the creator's segment.
        assert _segments(prefix) == [arena.name]


def test_attach_recovers_geometry_and_shares_memory(prefix: str) -> None:
    with HostArena.local(NUM_BLOCKS, 2 * 4 * 16, prefix=prefix) as owner:
        with HostArena.attach(owner.name) as attached:
            assert (attached.num_blocks, attached.block_bytes) == (NUM_BLOCKS, 128)
            assert not attached.created
            with attached.view() as theirs, owner.view() as ours:
                assert len(theirs) == len(ours) == NUM_BLOCKS * 128
                theirs[2 * 128 + 5] = 7
                assert ours[2 * 128 + 5] == 7
                assert sum(ours) == 7  # nothing else written
        assert _segments(prefix) == [owner.name]  # an attacher's exit leaves the segment
    assert _segments(prefix) == []


def test_close_refuses_while_a_view_is_alive(prefix: str) -> None:
    arena = HostArena.local(NUM_BLOCKS, BLOCK_BYTES, prefix=prefix)
    row = arena.view()[_span(1)]
    with pytest.raises(BufferError):
        arena.close()
    row.release()
    arena.close()
    arena.unlink()
    with pytest.raises(ValueError, match="closed"):
        arena.view()
    assert _segments(prefix) == []


def test_create_refuses_an_existing_name(prefix: str) -> None:
    with (
        HostArena.local(NUM_BLOCKS, BLOCK_BYTES, prefix=prefix) as arena,
        pytest.raises(FileExistsError),
    ):
        HostArena.create(arena.name, NUM_BLOCKS, BLOCK_BYTES)


def test_foreign_segments_are_neither_attached_nor_cleaned(prefix: str) -> None:
    (SHM_DIR / f"{prefix}foreign").write_bytes(b"not an arena" * 100)
    with pytest.raises(ValueError, match="magic"):
        HostArena.attach(f"{prefix}foreign")
    assert cleanup_stale(prefix) == []
    assert _segments(prefix) == [f"{prefix}foreign"]


def test_cleanup_stale_removes_the_arena_of_a_killed_creator(prefix: str) -> None:
    context = mp.get_context("spawn")
    ready, child_end = context.Pipe(duplex=False)  # a pipe, not an Event: no semaphore to leak
    stale_name = f"{prefix}crashed"
    child = context.Process(target=_create_and_hang, args=(stale_name, child_end))
    child.start()
    assert ready.poll(60) and ready.recv() == stale_name
    with HostArena.local(NUM_BLOCKS, BLOCK_BYTES, prefix=prefix) as live:
        assert cleanup_stale(prefix) == []  # creator still running
        child.kill()
        child.join()
        assert cleanup_stale(prefix) == [stale_name]
        assert _segments(prefix) == [live.name]
    assert _segments(prefix) == []


def test_close_and_unlink_leave_nothing_in_dev_shm(prefix: str) -> None:
    arena = HostArena.create(f"{prefix}plain", NUM_BLOCKS, BLOCK_BYTES)
    other = HostArena.attach(arena.name)
    other.close()
    arena.close()
    arena.unlink()
    assert _segments(prefix) == []


def _create_under_fsize_limit(name: str, result: Connection) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of dying
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    try:
        HostArena.create(name, 64, 64 * 1024)  # 4 MiB
    except OSError as e:
        result.send(str(e))
    else:
        result.send("created")


def test_an_arena_that_does_not_fit_fails_at_creation_not_later(prefix: str) -> None:
    """The segment is allocated up front (posix_fallocate), so no room means an error that
    says so, and no half-made segment, instead of a SIGBUS at the first write."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_create_under_fsize_limit, args=(f"{prefix}big", theirs))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    message = ours.recv()
    assert "needs 4198400 bytes of shared memory" in message
    assert _segments(prefix) == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a tmpfs")
def test_a_full_tmpfs_is_refused_with_the_free_space(
    prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(arena_module, "SHM_DIR", tmp_path)
        with pytest.raises(OSError, match="has 1048576 free") as raised:
            HostArena.create(f"{prefix}big", 64, 64 * 1024)
        assert raised.value.errno == errno.ENOSPC
        assert list(tmp_path.iterdir()) == []
        with HostArena.create(f"{prefix}small", 4, 64 * 1024) as small, small.view() as view:
            view[:] = b"\1" * len(view)  # allocated: writing it cannot fault
    finally:
        subprocess.run(["umount", str(tmp_path)], check=True)
