"""Checks shared by the swap manager's and the device memory's tests: which device blocks
the copies in flight touch, read from their orders alone, and that none is handed out."""

from __future__ import annotations

from collections.abc import Iterable

from common.kv.allocator import BlockAllocator
from common.kv.block_hash import TokenChain
from common.kv.swap_plan import SwapOrder
from services.scheduler.core.request_kv import RequestKV


def touched(orders: Iterable[SwapOrder]) -> set[int]:
    """Device blocks the copies read (swap-outs) or write (swap-ins)."""
    return {b for o in orders for b in o.device_blocks}


def assert_never_handed_out(allocator: BlockAllocator, busy: set[int]) -> None:
    """Takes every block the allocator would hand out now, checks that none is `busy`, and
    gives them back; and checks that every block is free, used or draining."""
    assert allocator.num_free + allocator.num_used + allocator.num_draining == \
        allocator.num_blocks
    probe = object()
    handed = allocator.allocate(probe, allocator.num_free)
    allocator.release(probe)
    assert not set(handed) & busy, f"blocks {sorted(set(handed) & busy)} are under a copy"


def request_kv(host_key: str, block_size: int) -> RequestKV:
    return RequestKV(host_key, private=False, chain=TokenChain(block_size, "fp"))
