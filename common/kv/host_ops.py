"""Host KV intents and their replies: what the scheduling core asks of host memory, as data.

The planner never calls the host. Each `StepPlan` carries the operations its decisions
need, in order; a driver carries them out (batched: one round trip per plan per store) and
feeds each reply back to `Planner.host_replied`, as h11 takes bytes in and hands events out.

Contract, for every driver:

- Operations on one store take effect in the order given, and a plan's operations before
  the next plan's.
- Exactly `Reserve` and `Pin` are answered, each by one reply with its `op_id`, even when
  the store fails: `Reserved(reservation=None)` (no room, or no store) and a `Pinned` miss.
- `Commit`, `Abort`, `Unpin` and `Release` are not answered. Their failures need no answer:
  a commit that could not be made shows up as a shorter hit on the `Pin` that follows it,
  and an abort or unpin that is lost is undone by the store's lease expiry.
- Chains are `TokenChain` hashes of the first `num_tokens` tokens, so the store never
  rehashes tokens, and token ids never travel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from common.kv.reuse_index import (
    Hit,
    HostCapacityExhausted,
    PinHandle,
    Reservation,
    StaleReservation,
    UnknownPin,
    UnknownReservation,
)

NO_PIN = 0  # the pin id of a pin that could not be made: it holds nothing
MISS = Hit(0, ())


@dataclass(frozen=True, slots=True)
class Reserve:
    """The valid prefix plus fresh blocks for the rest; answered by `Reserved`."""

    op_id: int
    conv: str
    chain: tuple[bytes, ...]
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Pin:
    """The valid prefix, pinned against eviction until `Unpin`; answered by `Pinned`."""

    op_id: int
    conv: str
    chain: tuple[bytes, ...]
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Commit:
    reservation_id: int


@dataclass(frozen=True, slots=True)
class Abort:
    reservation_id: int


@dataclass(frozen=True, slots=True)
class Unpin:
    pin_id: int


@dataclass(frozen=True, slots=True)
class Release:
    conv: str


HostOp = Reserve | Pin | Commit | Abort | Unpin | Release


@dataclass(frozen=True, slots=True)
class Reserved:
    op_id: int
    reservation: Reservation | None  # None: the host has no room, or could not be asked


@dataclass(frozen=True, slots=True)
class Pinned:
    op_id: int
    hit: Hit
    pin: PinHandle  # pin_id NO_PIN when nothing was pinned
    # The store instance that holds the longest valid prefix, when a shared index knows
    # (a routing hint for the scheduler's router; "" if none was named).
    holder: str = ""


HostReply = Reserved | Pinned


class HostIndex(Protocol):
    """What `apply` needs: `ReuseIndex`'s chain calls (see its contract)."""

    def reserve_chain(self, conv: str, chain: Sequence[bytes], num_tokens: int) -> Reservation:
        ...

    def pin_chain(
        self, conv: str, chain: Sequence[bytes], num_tokens: int
    ) -> tuple[Hit, PinHandle]: ...

    def commit(self, reservation_id: int) -> None: ...

    def abort(self, reservation_id: int) -> None: ...

    def unpin(self, pin_id: int) -> None: ...

    def release(self, conv: str) -> None: ...


def apply(index: HostIndex, ops: Iterable[HostOp]) -> list[HostReply]:
    """Carries `ops` out in order on one index; the replies, in the same order."""
    replies: list[HostReply] = []
    for op in ops:
        match op:
            case Reserve():
                try:
                    res = index.reserve_chain(op.conv, op.chain, op.num_tokens)
                except HostCapacityExhausted:
                    res = None
                replies.append(Reserved(op.op_id, res))
            case Pin():
                hit, pin = index.pin_chain(op.conv, op.chain, op.num_tokens)
                replies.append(Pinned(op.op_id, hit, pin))
            case Commit():
                with suppress(StaleReservation, UnknownReservation):
                    index.commit(op.reservation_id)  # else the next Pin finds less
            case Abort():
                with suppress(UnknownReservation):
                    index.abort(op.reservation_id)
            case Unpin():
                if op.pin_id != NO_PIN:
                    with suppress(UnknownPin):
                        index.unpin(op.pin_id)
            case Release():
                index.release(op.conv)
    return replies


def unanswered(ops: Iterable[HostOp]) -> list[HostReply]:
    """The replies of a store that could not be reached: no room, nothing pinned."""
    replies: list[HostReply] = []
    for op in ops:
        if isinstance(op, Reserve):
            replies.append(Reserved(op.op_id, None))
        elif isinstance(op, Pin):
            replies.append(Pinned(op.op_id, MISS, PinHandle(NO_PIN, ())))
    return replies
