"""Opening the store's arena at start: a fresh segment, holding an inherited one's bytes.

Each start creates a new segment named `<base>.<epoch>` (a random epoch), owned by this
process. If the shared index names a segment this instance left behind when it crashed,
and it still exists with the same geometry, its bytes are copied into the new segment, so
that the chains recorded for it stay valid. Every other segment of this base (an earlier
epoch: only one store runs per instance id) is then removed. Other instances' segments are
left alone, even when their creator looks dead: that instance may be restarting to inherit
its own, and a pid says nothing in a container restarted with the same pid 1 (`fastswitch
up`, which owns every store on its host, sweeps dead creators' arenas when it starts). The
copy, rather than adopting the old segment in place, keeps the owner pid in every header
live, so no other process's `cleanup_stale` can unlink the segment under a running store.
The epoch makes a segment name unique per creation: a name recorded in the index denotes
exactly one segment's memory, even across pid reuse or a fresh /dev/shm.
"""

from __future__ import annotations

import re
import uuid

from common.shm.arena import ARENA_PREFIX, SHM_DIR, HostArena

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_EPOCH_CHARS = 12


def default_arena_base(instance_id: str) -> str:
    return f"{ARENA_PREFIX}kvstore-{_NAME_CHARS.sub('-', instance_id)}"


def open_arena(
    base: str, num_blocks: int, block_bytes: int, inherit: str | None = None
) -> tuple[HostArena, bool]:
    """The new arena, and whether it holds the bytes of segment `inherit`."""
    arena = HostArena.create(f"{base}.{uuid.uuid4().hex[:_EPOCH_CHARS]}", num_blocks,
                             block_bytes)
    try:
        inherited = inherit is not None and _copy_into(arena, inherit)
        epoch = re.compile(re.escape(base) + rf"\.[0-9a-f]{{{_EPOCH_CHARS}}}")
        for old in SHM_DIR.glob(f"{base}.*"):
            if old.name != arena.name and epoch.fullmatch(old.name):
                old.unlink(missing_ok=True)  # mappings of it (an executor's) stay valid
    except BaseException:
        arena.unlink()
        arena.close()
        raise
    return arena, inherited


def _copy_into(arena: HostArena, name: str) -> bool:
    try:
        old = HostArena.attach(name)
    except (FileNotFoundError, ValueError):
        return False
    try:
        if (old.num_blocks, old.block_bytes) != (arena.num_blocks, arena.block_bytes):
            return False
        with arena.view() as dst, old.view() as src:
            dst[:] = src
        return True
    finally:
        old.close()
