"""The embedded store: a host tier over an index in this process (`--kvstore embedded`)."""

from __future__ import annotations

from collections.abc import Sequence

from common.kv import host_ops
from common.kv.host_ops import HostOp, HostReply
from common.kv.reuse_index import ReuseIndex
from services.scheduler.host_tier import HostTier


class LocalHost(HostTier):
    """`host_ops.apply` on an in-process index over one arena, which must be the executor's
    first; never degraded, never down."""

    def __init__(self, index: ReuseIndex, arena: str) -> None:
        self.index = index
        self._arenas = (arena,)

    @property
    def arenas(self) -> tuple[str, ...]:
        return self._arenas

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]:
        return host_ops.apply(self.index, ops)
