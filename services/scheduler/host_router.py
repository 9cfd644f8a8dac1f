"""One host KV space over one or more KV store instances: the planner's `HostKV`.

Ids. The executor maps the stores' arenas one after another, in attach order, so block `b`
of store `i` is global block `first_block[i] + b`. Reservation and pin ids become global as
`local * n + i` for n stores (0, "no pin", stays 0), so a commit or an unpin finds its
store. With one store mapped first, every id is the store's own.

Placement. A conversation that an instance holds is looked up, reserved, pinned and
released on that instance: with a shared Redis index a Lookup on any instance names the
holder, and the router remembers it. A conversation nobody holds goes to the live instance
with the highest rendezvous weight, `blake2b(instance_id + NUL + conversation_id)`: each
instance gets an even share, and when one goes down only its own conversations move.

Failure. A store that cannot be reached is marked down. Calls that need it degrade as with
one store (lookups miss, reservations and commits fail, so preemption recomputes), and it
is probed again every `retry_s` by `probe_down`, which the scheduler calls off the planner's
thread, so that a stalled store never holds the planner up for more than one call's
deadline. A store that answers with the arena it had is back at once; one that restarted
with a new arena is named by `probe_down`, and is back once the scheduler has had the
executor map that arena and called `rejoin` (the chains it held before are gone, unless it
inherited them through Redis). `rebase` follows a restarted executor that mapped the
arenas at other first blocks.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from common.kv.reuse_index import (
    Hit,
    HostCapacityExhausted,
    PinHandle,
    Reservation,
    StaleReservation,
)

log = logging.getLogger("fastswitch.scheduler.kvstore")

NO_PIN = 0  # the pin id of a pin that could not be made: it holds nothing
_MISS = Hit(0, ())


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """What makes a store's host block ids mean the same memory: its arena."""

    instance_id: str
    arena_name: str


class StoreClient(Protocol):
    """One store. Failures degrade as `RemoteHostKV` documents; an unreachable store also
    calls `on_unreachable`."""

    on_unreachable: Callable[[], None] | None

    def lookup(self, conv: str, tokens: Sequence[int]) -> tuple[Hit, str]:
        """The hit, and the instance id of the store whose blocks it names."""

    def reserve(self, conv: str, tokens: Sequence[int]) -> Reservation: ...

    def commit(self, reservation_id: int) -> None: ...

    def abort(self, reservation_id: int) -> None: ...

    def pin(self, conv: str, tokens: Sequence[int]) -> tuple[Hit, PinHandle]: ...

    def unpin(self, pin_id: int) -> None: ...

    def release(self, conv: str) -> None: ...

    def identity(self) -> StoreIdentity | None:
        """None when the store does not answer."""


@dataclass(frozen=True, slots=True)
class RoutedStore:
    """A store and where the executor mapped its arena."""

    client: StoreClient
    identity: StoreIdentity
    first_block: int


def rendezvous_weight(conv: str, instance_id: str) -> int:
    digest = hashlib.blake2b(f"{instance_id}\0{conv}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_owner(conv: str, instance_ids: Sequence[str]) -> str:
    """The instance a new conversation is placed on (ties, never seen, go to the larger id)."""
    return max(instance_ids, key=lambda i: (rendezvous_weight(conv, i), i))


@dataclass(slots=True, eq=False)
class _Instance:
    index: int
    store: RoutedStore
    retry_at: float | None = None  # set while the store is down
    moved_warned: bool = False

    @property
    def instance_id(self) -> str:
        return self.store.identity.instance_id

    def to_global(self, blocks: Sequence[int]) -> tuple[int, ...]:
        first = self.store.first_block
        return tuple(first + b for b in blocks)


class HostRouter:
    def __init__(
        self,
        stores: Sequence[RoutedStore],
        *,
        fingerprint: str,
        block_size: int,
        retry_s: float = 5.0,
        max_holders: int = 1 << 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not stores:
            raise ValueError("a router needs at least one store")
        ids = [s.identity.instance_id for s in stores]
        if len(set(ids)) != len(ids):
            raise ValueError(f"store instance ids repeat: {ids}")
        self.fingerprint = fingerprint
        self.block_size = block_size
        self.stores = tuple(stores)  # in the executor's attach order
        self.retry_s = retry_s
        self._clock = clock
        self._instances = [_Instance(i, s) for i, s in enumerate(stores)]
        self._by_id = {inst.instance_id: inst for inst in self._instances}
        for inst in self._instances:
            inst.store.client.on_unreachable = lambda inst=inst: self._mark_down(inst)
        # conversation -> its holder, most recently used last; bounded, because a forgotten
        # holder only costs a Lookup's redirect (or, without Redis, one cold turn).
        self._holders: OrderedDict[str, _Instance] = OrderedDict()
        self._max_holders = max_holders

    @property
    def degraded(self) -> bool:
        """Some store is down: its conversations recompute."""
        return any(inst.retry_at is not None for inst in self._instances)

    def lookup(self, conv: str, tokens: Sequence[int], chain: Sequence[bytes] = ()) -> Hit:
        asked = self._route(conv)
        if asked is None:
            return _MISS
        hit, holder_id = asked.store.client.lookup(conv, tokens)
        holder = self._by_id.get(holder_id)
        if not hit.num_tokens or holder is None or holder.retry_at is not None:
            return _MISS  # nothing held, or held where this scheduler cannot read it
        self._remember(conv, holder)
        return Hit(hit.num_tokens, holder.to_global(hit.blocks))

    def reserve(
        self, conv: str, tokens: Sequence[int], chain: Sequence[bytes] = ()
    ) -> Reservation:
        inst = self._route(conv)
        if inst is None:
            raise HostCapacityExhausted("no KV store instance is up")
        res = inst.store.client.reserve(conv, tokens)
        self._remember(conv, inst)
        return replace(
            res,
            reservation_id=self._global_id(inst, res.reservation_id),
            valid_blocks=inst.to_global(res.valid_blocks),
            new_blocks=inst.to_global(res.new_blocks),
        )

    def commit(self, reservation_id: int) -> None:
        inst, local = self._decode(reservation_id)
        if inst.retry_at is not None:
            raise StaleReservation(f"KV store {inst.instance_id} is down")
        inst.store.client.commit(local)

    def abort(self, reservation_id: int) -> None:
        inst, local = self._decode(reservation_id)
        if inst.retry_at is None:  # a down store drops it when the lease runs out
            inst.store.client.abort(local)

    def pin(
        self, conv: str, tokens: Sequence[int], chain: Sequence[bytes] = ()
    ) -> tuple[Hit, PinHandle]:
        inst = self._route(conv)
        if inst is None:
            return _MISS, PinHandle(NO_PIN, ())
        hit, handle = inst.store.client.pin(conv, tokens)
        blocks = inst.to_global(handle.blocks)
        return (
            Hit(hit.num_tokens, inst.to_global(hit.blocks)),
            PinHandle(self._global_id(inst, handle.pin_id), blocks),
        )

    def unpin(self, pin_id: int) -> None:
        if pin_id == NO_PIN:
            return
        inst, local = self._decode(pin_id)
        if inst.retry_at is None:
            inst.store.client.unpin(local)

    def release(self, conv: str) -> None:
        inst = self._route(conv)
        self._holders.pop(conv, None)
        if inst is not None:
            inst.store.client.release(conv)

    def _route(self, conv: str) -> _Instance | None:
        """The conversation's holder if it is up, else its rendezvous owner among the live."""
        holder = self._holders.get(conv)
        if holder is not None and holder.retry_at is None:
            self._holders.move_to_end(conv)
            return holder
        live = self._live()
        if not live:
            return None
        owner = rendezvous_owner(conv, [inst.instance_id for inst in live])
        return self._by_id[owner]

    def probe_down(self) -> list[tuple[int, StoreIdentity]]:
        """Probes each down store whose retry time has come; blocking, and safe to call off
        the planner's thread (it only clears or moves an instance's `retry_at`). Returns
        (index, identity) of those that answer with a new arena, for `rejoin`."""
        now = self._clock()
        moved = []
        for inst in self._instances:
            if inst.retry_at is not None and inst.retry_at <= now:
                identity = self._probe(inst)
                if identity is not None and identity.instance_id == inst.instance_id:
                    moved.append((inst.index, identity))
        return moved

    def rejoin(self, index: int, identity: StoreIdentity, first_block: int) -> None:
        """Takes store `index` back with its new arena, which the executor maps at
        `first_block`."""
        inst = self._instances[index]
        inst.store = replace(inst.store, identity=identity, first_block=first_block)
        self.stores = tuple(i.store for i in self._instances)
        inst.retry_at = None
        inst.moved_warned = False
        log.info("KV store %s is back with arena %s (host blocks from %d)",
                 inst.instance_id, identity.arena_name, first_block)

    def rebase(self, first_blocks: Sequence[int | None]) -> bool:
        """Follows a restarted executor that mapped the stores' arenas (in order) at these
        first blocks; True if any moved, which makes every host block id held stale. None:
        the store's arena is gone (it restarted), so it is down, and probed at once, until
        it `rejoin`s with its new one."""
        moved = False
        for inst, first in zip(self._instances, first_blocks, strict=True):
            if first is None:
                inst.retry_at = self._clock()
                moved = True
            elif first != inst.store.first_block:
                inst.store = replace(inst.store, first_block=first)
                moved = True
        self.stores = tuple(i.store for i in self._instances)
        return moved

    def _live(self) -> list[_Instance]:
        return [inst for inst in self._instances if inst.retry_at is None]

    def _probe(self, inst: _Instance) -> StoreIdentity | None:
        """Back if it answers with its arena; the identity it answers with if another."""
        identity = inst.store.client.identity()
        if identity == inst.store.identity:
            inst.retry_at = None
            log.info("KV store %s answers again; new conversations may go to it",
                     inst.instance_id)
            return None
        inst.retry_at = self._clock() + self.retry_s
        if identity is not None and not inst.moved_warned:
            inst.moved_warned = True
            log.warning("KV store %s restarted with arena %s instead of %s; it stays out "
                        "until the executor maps the new one", inst.instance_id,
                        identity.arena_name, inst.store.identity.arena_name)
        return identity

    def _mark_down(self, inst: _Instance) -> None:
        if inst.retry_at is None:
            log.warning("KV store %s is unreachable: its conversations recompute; probing it "
                        "every %.0f s", inst.instance_id, self.retry_s)
        inst.retry_at = self._clock() + self.retry_s

    def _remember(self, conv: str, inst: _Instance) -> None:
        self._holders[conv] = inst
        self._holders.move_to_end(conv)
        if len(self._holders) > self._max_holders:
            self._holders.popitem(last=False)

    def _global_id(self, inst: _Instance, local: int) -> int:
        return NO_PIN if local == NO_PIN else local * len(self._instances) + inst.index

    def _decode(self, global_id: int) -> tuple[_Instance, int]:
        n = len(self._instances)
        return self._instances[global_id % n], global_id // n
