"""What the scheduler's driver carries host intents out through (`common.kv.host_ops`):
one or more KV stores (`HostRouter`), or an index in this process (`LocalHost`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from common.kv.host_ops import HostOp, HostReply, apply
from common.kv.reuse_index import ReuseIndex


class HostGateway(Protocol):
    """Carries out one plan's host operations and answers them, as `host_ops` requires:
    never raises, and a store that fails answers `unanswered`."""

    @property
    def degraded(self) -> bool:
        """Some store is down: its conversations recompute."""

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]: ...


class LocalHost:
    """The embedded store: an index in the scheduler's own process."""

    degraded = False

    def __init__(self, index: ReuseIndex) -> None:
        self.index = index

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]:
        return apply(self.index, ops)
