"""Chunking and checksums of the bulk byte API (ReadBlocks / WriteBlocks).

The checksum is zlib's CRC-32 (IEEE), not CRC-32C: no CRC-32C implementation with a
pure-Python fallback is installed, and the proto field `crc32c` documents this meaning.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

from common.kv.extent import Extent
from protos import kvstore_pb2

CHUNK_BYTES = 1 << 20


def checksum(data: bytes | memoryview) -> int:
    return zlib.crc32(data)


def chunk_spans(total: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most `chunk_bytes` covering `total` bytes."""
    for offset in range(0, total, chunk_bytes):
        yield offset, min(chunk_bytes, total - offset)


def to_proto(extents: Sequence[Extent]) -> list[kvstore_pb2.Extent]:
    return [kvstore_pb2.Extent(start=e.start, length=e.length) for e in extents]


def from_proto(extents: Sequence[kvstore_pb2.Extent]) -> list[Extent]:
    return [Extent(e.start, e.length) for e in extents]


def write_chunks(
    client_id: str, reservation_id: int, extents: Sequence[Extent], payload: bytes
) -> Iterator[kvstore_pb2.WriteBlocksChunk]:
    """A WriteBlocks request stream; the first chunk names the reservation, its owner and
    the extents."""
    view = memoryview(payload)
    for offset, length in chunk_spans(len(payload)):
        data = view[offset : offset + length]
        chunk = kvstore_pb2.WriteBlocksChunk(offset=offset, data=bytes(data), crc32c=checksum(data))
        if offset == 0:
            chunk.reservation_id = reservation_id
            chunk.client_id = client_id
            chunk.extents.extend(to_proto(extents))
        yield chunk
