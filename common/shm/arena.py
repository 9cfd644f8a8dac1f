"""The host KV arena: a named POSIX shared-memory segment of equal-sized blocks.

The kvstore creates it and owns its lifetime; the executor attaches to it and copies KV in
and out without any bytes crossing a socket. Its per-block layout is the device cache's.

We map `/dev/shm/<name>` with os + mmap rather than `multiprocessing.shared_memory`: the
latter registers every segment with the resource tracker, which in Python 3.11 unlinks even
segments a process merely attached to when that process exits. Here only `unlink()` removes
a segment, and `cleanup_stale` removes those whose creator died without calling it.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

SHM_DIR = Path("/dev/shm")
ARENA_PREFIX = "fastswitch-"

_MAGIC = b"FSARENA\0"
_VERSION = 1
# magic, version, num_blocks, block_bytes, creator pid, creator host (pid namespaces differ
# between containers sharing /dev/shm, so a pid means something only on its own host).
_HEADER = struct.Struct("<8sIQQQ64s")
# Data starts on a page boundary so that pinning (cudaHostRegister) and DMA see aligned memory.
_DATA_OFFSET = mmap.PAGESIZE


@dataclass(frozen=True, slots=True)
class ArenaHeader:
    num_blocks: int
    block_bytes: int
    creator_pid: int
    creator_host: str

    def pack(self) -> bytes:
        host = self.creator_host.encode()[:64]
        return _HEADER.pack(
            _MAGIC, _VERSION, self.num_blocks, self.block_bytes, self.creator_pid, host
        )

    @classmethod
    def unpack(cls, raw: bytes) -> ArenaHeader:
        if len(raw) < _HEADER.size:
            raise ValueError("segment too short for an arena header")
        magic, version, num_blocks, block_bytes, pid, host = _HEADER.unpack_from(raw)
        if magic != _MAGIC:
            raise ValueError("segment is not a FastSwitch arena (bad magic)")
        if version != _VERSION:
            raise ValueError(f"arena header version {version}, expected {_VERSION}")
        return cls(num_blocks, block_bytes, pid, host.rstrip(b"\0").decode())


class HostArena:
    """A mapped arena; `created` tells whether this handle owns (and should unlink) it."""

    def __init__(self, name: str, header: ArenaHeader, mapping: mmap.mmap, created: bool):
        self.name = name
        self.num_blocks = header.num_blocks
        self.block_bytes = header.block_bytes
        self.creator_pid = header.creator_pid
        self.created = created
        self._mmap: mmap.mmap | None = mapping

    @classmethod
    def create(cls, name: str, num_blocks: int, block_bytes: int) -> HostArena:
        if num_blocks <= 0 or block_bytes <= 0:
            raise ValueError(f"arena needs positive geometry, got {num_blocks}x{block_bytes}")
        path = _segment_path(name)
        header = ArenaHeader(num_blocks, block_bytes, os.getpid(), os.uname().nodename)
        size = _DATA_OFFSET + num_blocks * block_bytes
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            _reserve(fd, path, size)
            mapping = mmap.mmap(fd, 0)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        mapping[: _HEADER.size] = header.pack()
        return cls(name, header, mapping, created=True)

    @classmethod
    def attach(cls, name: str) -> HostArena:
        """Maps an existing arena; FileNotFoundError if `name` is no regular file there."""
        path = _segment_path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no shared-memory segment {name!r}")
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        try:
            header = ArenaHeader.unpack(mapping[: _HEADER.size])
            expected = _DATA_OFFSET + header.num_blocks * header.block_bytes
            if len(mapping) < expected:
                raise ValueError(f"arena {name} is {len(mapping)} bytes, header says {expected}")
        except ValueError:
            mapping.close()
            raise
        return cls(name, header, mapping, created=False)

    @classmethod
    def local(cls, num_blocks: int, block_bytes: int, prefix: str = ARENA_PREFIX) -> HostArena:
        """A uniquely named arena for a standalone executor or a test; its owner unlinks it."""
        return cls.create(f"{prefix}local-{os.getpid()}-{uuid.uuid4().hex[:12]}",
                          num_blocks, block_bytes)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def view(self) -> memoryview:
        """The blocks' bytes, flat and zero-copy (block i at `i * block_bytes`).

        A view, and anything built over it (a numpy array, a tensor), keeps the mapping
        alive: `close()` refuses while any exists, so none can outlive the memory under it.
        """
        data = memoryview(self._mapping())
        return data[_DATA_OFFSET : _DATA_OFFSET + self.nbytes]

    def close(self) -> None:
        """Unmap; raises BufferError while views from `view` are still alive."""
        if self._mmap is None:
            return
        self._mmap.close()
        self._mmap = None

    def unlink(self) -> None:
        """Remove the segment name; mappings that exist stay valid until closed."""
        _segment_path(self.name).unlink(missing_ok=True)

    def __enter__(self) -> HostArena:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.created:
            self.unlink()
        self.close()

    def _mapping(self) -> mmap.mmap:
        if self._mmap is None:
            raise ValueError(f"arena {self.name} is closed")
        return self._mmap


def _reserve(fd: int, path: Path, size: int) -> None:
    """Allocates every page now: a sparse segment would SIGBUS on first touch when the
    shared-memory filesystem is full, so a too-small one fails here, with a reason."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EFBIG):
            raise
        free = shutil.disk_usage(path.parent).free
        raise OSError(
            e.errno,
            f"arena {path.name} needs {size} bytes of shared memory, {path.parent} has "
            f"{free} free: give it more (Docker: shm_size or the tmpfs volume's size) or "
            f"use fewer host blocks",
        ) from e


def cleanup_stale(prefix: str = ARENA_PREFIX) -> list[str]:
    """Unlink arenas under `prefix` whose creator on this host is dead (a crashed run).

    Call it from the process that creates arenas, in the creators' pid namespace; segments
    that are not arenas, or were created on another host, are left alone.
    """
    removed: list[str] = []
    host = os.uname().nodename
    for path in sorted(SHM_DIR.glob(f"{prefix}*")):
        try:
            with path.open("rb") as segment:
                header = ArenaHeader.unpack(segment.read(_HEADER.size))
        except (OSError, ValueError):
            continue
        if header.creator_host != host[:64] or _alive(header.creator_pid):
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_SEGMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")


def _segment_path(name: str) -> Path:
    if not _SEGMENT_NAME.fullmatch(name):
        raise ValueError(f"bad shared-memory name {name[:64]!r}: 1 to 255 letters, digits, "
                         "'_', '.' or '-', not starting with '.' or '-'")
    return SHM_DIR / name
