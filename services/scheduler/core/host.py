"""What the planner needs from host KV memory. `ReuseIndex` provides it in process; the
scheduler service provides it over gRPC from the KV store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from common.kv.reuse_index import Hit, PinHandle, Reservation


class HostKV(Protocol):
    """See `common.kv.reuse_index` for the contract: two-phase puts, pins, eviction.
    `reserve` raises `HostCapacityExhausted` when nothing can be evicted; `commit` raises
    `StaleReservation` when the conversation changed under the reservation."""

    fingerprint: str
    block_size: int

    def lookup(self, conv: str, tokens: Sequence[int], chain: Sequence[bytes]) -> Hit: ...

    def reserve(
        self, conv: str, tokens: Sequence[int], chain: Sequence[bytes]
    ) -> Reservation: ...

    def commit(self, reservation_id: int) -> None: ...

    def abort(self, reservation_id: int) -> None: ...

    def pin(
        self, conv: str, tokens: Sequence[int], chain: Sequence[bytes]
    ) -> tuple[Hit, PinHandle]: ...

    def unpin(self, pin_id: int) -> None: ...

    def release(self, conv: str) -> None: ...
