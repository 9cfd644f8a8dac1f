"""Block geometry of the two caches, and the byte ranges a swap plan turns into.

Both caches are block-major with the same per-block layout, so block `b` is the byte range
`[b * block_bytes, (b + 1) * block_bytes)` on either side and an extent is one range.
Validation happens here, before any backend touches memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from common.kv.swap_plan import Copy, Direction

DIRECTIONS: tuple[Direction, ...] = tuple(Direction)


@dataclass(frozen=True, slots=True)
class ByteRange:
    src: int
    dst: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Side:
    name: str
    blocks: int


@dataclass(frozen=True, slots=True)
class BlockLayout:
    device_blocks: int
    host_blocks: int
    block_bytes: int

    @classmethod
    def of(cls, device: torch.Tensor, host: torch.Tensor) -> BlockLayout:
        """Geometry of two block-major caches; they must agree on bytes per block."""
        device_block = _block_bytes("device", device)
        host_block = _block_bytes("host", host)
        if device_block != host_block:
            raise ValueError(f"device blocks are {device_block} bytes, host blocks {host_block}")
        return cls(device.shape[0], host.shape[0], device_block)

    def sides(self, direction: Direction) -> tuple[Side, Side]:
        device, host = Side("device", self.device_blocks), Side("host", self.host_blocks)
        if direction == "out":
            return device, host
        if direction == "in":
            return host, device
        raise ValueError(f"direction must be 'out' or 'in', got {direction!r}")

    def byte_ranges(self, direction: Direction, copies: Sequence[Copy]) -> tuple[ByteRange, ...]:
        """One range per copy; raises ValueError (naming the copy) if any copy is invalid."""
        src_side, dst_side = self.sides(direction)
        for index, copy in enumerate(copies):
            if copy.src.length != copy.dst.length:
                raise ValueError(
                    f"copy {index}: src {copy.src} and dst {copy.dst} differ in length"
                )
            for role, extent, side in (("src", copy.src, src_side), ("dst", copy.dst, dst_side)):
                if extent.end > side.blocks:
                    raise ValueError(
                        f"copy {index}: {role} blocks {extent.start}..{extent.end - 1} are "
                        f"outside the {side.blocks} {side.name} blocks"
                    )
        by_dst = sorted(range(len(copies)), key=lambda index: copies[index].dst.start)
        for first, second in pairwise(by_dst):
            if copies[second].dst.start < copies[first].dst.end:
                raise ValueError(
                    f"copies {first} and {second} both write {dst_side.name} block "
                    f"{copies[second].dst.start}"
                )
        size = self.block_bytes
        return tuple(
            ByteRange(copy.src.start * size, copy.dst.start * size, copy.num_blocks * size)
            for copy in copies
        )


def _block_bytes(name: str, cache: torch.Tensor) -> int:
    if cache.dim() == 0 or cache.shape[0] == 0 or not cache.is_contiguous():
        raise ValueError(f"{name} cache must be a contiguous tensor of at least one block")
    return cache[0].numel() * cache.element_size()
