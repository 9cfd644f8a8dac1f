"""What the scheduler's driver carries a plan's host intents out through.

`HostGateway.execute` follows `common.kv.host_ops`'s contract: the ops take effect in the
order given, and exactly the Reserve and Pin ops are answered, in order, even when a store
fails. `HostRouter` is the gateway to KV store services; `LocalHost` is the embedded store,
an index in this process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from common.kv import host_ops
from common.kv.host_ops import HostOp, HostReply
from common.kv.reuse_index import ReuseIndex


class HostGateway(Protocol):
    @property
    def degraded(self) -> bool:
        """Some store is down: its conversations recompute."""

    @property
    def degraded_seconds(self) -> float:
        """Seconds it has been degraded, over its life."""

    @property
    def store_counts(self) -> tuple[int, int]:
        """KV store instances in use, and how many of them are down."""

    @property
    def arenas(self) -> Sequence[str]:
        """The host arenas the executor maps for this gateway, in attach order."""

    async def remap(self, attach: Callable[[str], Awaitable[int | None]]) -> bool:
        """Has a restarted executor map the arenas again, with `attach` (an arena's first
        block there; None: it is gone), and follows where they landed; True if any moved,
        which makes every host block id held stale."""

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]: ...


class LocalHost:
    """The embedded store: `host_ops.apply` on an in-process index over one arena, which
    must be the executor's first; never degraded."""

    degraded = False
    degraded_seconds = 0.0
    store_counts = (0, 0)  # no store process

    def __init__(self, index: ReuseIndex, arena: str) -> None:
        self.index = index
        self.arenas = (arena,)

    async def remap(self, attach: Callable[[str], Awaitable[int | None]]) -> bool:
        return await attach(self.arenas[0]) != 0

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]:
        return host_ops.apply(self.index, ops)
