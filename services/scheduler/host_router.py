"""One host KV space over one or more KV store instances: a `HostTier` over theirs.

`execute` carries a plan's host intents (`common.kv.host_ops`) out: it routes each op to
its store, sends one batch per store through that store's tier (the store itself, or a
mirror in front of it: `remote_tier`), to all stores at once, and answers every Reserve and
Pin in the order of the ops, as the `host_tier` contract requires.

Ids. The executor maps the stores' arenas one after another, in attach order, so block `b`
of a store whose arena starts at `first_block` is global block `first_block + b`.
Stores join and leave (`add`, `remove`); each one that joins takes the next of 2**16 slots,
never reused while the router lives, and its reservation and pin ids become global as
`slot << 48 | local` (store ids are 48-bit; 0, "no pin", stays 0), so a commit or an unpin
finds its store, and one for a store that left is dropped. The first store's ids are its
own.

Placement. A conversation that an instance holds is reserved, pinned and released on that
instance: with a shared Redis index a Pin on any instance names the holder of the longest
valid prefix, and the router remembers it for the ops that follow (the Pin itself is
answered by the instance asked). A conversation nobody holds goes to the live instance with
the highest rendezvous weight, `blake2b(instance_id + NUL + conversation_id)`: each
instance gets an even share, and when one goes down or leaves only its own conversations
move.

Failure. A store whose tier reports it down (`on_down`: it cannot be reached, or answers
from an arena other than the one the executor mapped) is marked down. Ops for it get
`unanswered` replies (no room, nothing pinned, so preemption recomputes; commits, aborts
and unpins are dropped and its leases undo them), and it is probed again every `retry_s`
by `probe_down`. A store that answers with the arena it had is back at once; one that
restarted with a new arena is named by `probe_down`, and its driver replaces it
(`remove`, then `add` with the arena the executor mapped: the chains it held before are
gone, unless it inherited them through Redis). `rebase` follows a restarted executor that
mapped the arenas at other first blocks. With no store at all, every op is `unanswered`.
`degraded_seconds` adds up the time the router was degraded.

Leases. The stores lease what they hold for the router's clients; `renew` has every live
store's tier renew its leases (the driver calls it every renew interval).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from common.kv.host_ops import (
    NO_PIN,
    Abort,
    Commit,
    HostOp,
    HostReply,
    Pin,
    Pinned,
    Release,
    Reserve,
    Reserved,
    Unpin,
    unanswered,
)
from common.kv.reuse_index import ID_BITS, Hit, PinHandle
from services.scheduler.host_tier import Attach, HostTier
from services.scheduler.remote_host import RemoteHostKV, StoreIdentity

log = logging.getLogger("fastswitch.scheduler.kvstore")

SLOTS = 1 << 16  # stores that may join one router over its life
LOCAL_MASK = (1 << ID_BITS) - 1


@dataclass(frozen=True, slots=True)
class RoutedStore:
    """A store, where the executor mapped the arena that holds its blocks, and the tier its
    ops go through: the store itself, or a tier in front of it (`front`, a mirror whose
    arena the executor maps instead, for a store on another host)."""

    client: RemoteHostKV
    first_block: int
    front: HostTier | None = None

    @property
    def tier(self) -> HostTier:
        return self.front or self.client

    @property
    def identity(self) -> StoreIdentity:
        return self.client.identity

    @property
    def arena(self) -> str:
        """The arena the executor maps for this store."""
        return self.tier.arenas[0]


def rendezvous_weight(conv: str, instance_id: str) -> int:
    digest = hashlib.blake2b(f"{instance_id}\0{conv}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_owner(conv: str, instance_ids: Sequence[str]) -> str:
    """The instance a new conversation is placed on (ties, never seen, go to the larger id)."""
    return max(instance_ids, key=lambda i: (rendezvous_weight(conv, i), i))


@dataclass(slots=True, eq=False)
class _Instance:
    slot: int
    store: RoutedStore
    retry_at: float | None = None  # set while the store is down
    moved_warned: bool = False

    @property
    def instance_id(self) -> str:
        return self.store.identity.instance_id

    def to_global(self, blocks: Sequence[int]) -> tuple[int, ...]:
        first = self.store.first_block
        return tuple(first + b for b in blocks)


class HostRouter(HostTier):
    def __init__(
        self,
        stores: Sequence[RoutedStore] = (),
        *,
        fingerprint: str,
        block_size: int,
        retry_s: float = 5.0,
        max_holders: int = 1 << 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fingerprint = fingerprint
        self.block_size = block_size
        self.retry_s = retry_s
        self._clock = clock
        self._by_slot: dict[int, _Instance] = {}  # in the executor's attach order
        self._by_id: dict[str, _Instance] = {}
        self._next_slot = 0
        # conversation -> its holder, most recently used last; bounded, because a forgotten
        # holder only costs a Pin's redirect (or, without Redis, one cold turn).
        self._holders: OrderedDict[str, _Instance] = OrderedDict()
        self._max_holders = max_holders
        # Held by whoever changes the membership (StoreMembership) and across `remap`.
        self.lock = asyncio.Lock()
        self._degraded_total = 0.0  # seconds degraded before `_degraded_since`
        self._degraded_since: float | None = clock()  # None: not degraded; no store yet
        for store in stores:
            self.add(store)

    @property
    def stores(self) -> tuple[RoutedStore, ...]:
        """The stores, in the order they joined."""
        return tuple(inst.store for inst in self._by_slot.values())

    def store(self, instance_id: str) -> RoutedStore | None:
        """The store in under `instance_id`, if any."""
        inst = self._by_id.get(instance_id)
        return None if inst is None else inst.store

    @property
    def arenas(self) -> tuple[str, ...]:
        """The arenas the executor maps for the stores, in the order they joined."""
        return tuple(inst.store.arena for inst in self._by_slot.values())

    def add(self, store: RoutedStore) -> None:
        """Takes a store in, up, with the arena the executor mapped for it. Raises
        ValueError if its instance id is taken, RuntimeError when the slots are spent."""
        instance_id = store.identity.instance_id
        if instance_id in self._by_id:
            raise ValueError(f"store instance ids repeat: {instance_id!r} is in already")
        if self._next_slot >= SLOTS:
            raise RuntimeError(f"{SLOTS} stores joined this router: restart the scheduler")
        inst = _Instance(self._next_slot, store)
        self._next_slot += 1
        store.tier.on_down = lambda why: self._mark_down(inst, why)
        self._by_slot[inst.slot] = self._by_id[instance_id] = inst
        self._note_degraded()

    def remove(self, instance_id: str) -> RoutedStore:
        """Lets a store go: its conversations move to the others (they recompute), and ops
        in its ids are dropped from now on. Raises KeyError if it is not in."""
        inst = self._by_id.pop(instance_id)
        del self._by_slot[inst.slot]
        inst.store.tier.on_down = None
        for conv in [c for c, holder in self._holders.items() if holder is inst]:
            del self._holders[conv]
        self._note_degraded()
        return inst.store

    @property
    def degraded(self) -> bool:
        """Some store is down, or there is none: their conversations recompute."""
        return not self._by_slot or any(inst.retry_at is not None for inst in self._instances)

    @property
    def degraded_seconds(self) -> float:
        """Seconds this router has been degraded, over its life."""
        since = self._degraded_since
        return self._degraded_total + (0.0 if since is None else self._clock() - since)

    async def renew(self) -> None:
        """Has each live store's tier renew its leases there, all at once."""
        await asyncio.gather(*(inst.store.tier.renew() for inst in self._live()))

    @property
    def store_counts(self) -> tuple[int, int]:
        """Stores in, and how many of them are down."""
        return len(self._by_slot), sum(inst.retry_at is not None for inst in self._instances)

    @property
    def _instances(self) -> Iterable[_Instance]:
        return self._by_slot.values()

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]:
        """Carries `ops` out, one Batch per store, all stores at once; the replies to the
        Reserve and Pin ops, in their order, in global ids and blocks."""
        batches: dict[_Instance, list[HostOp]] = {}
        slots: dict[_Instance, list[int]] = {}  # each store's answered ops: reply positions
        replies: list[HostReply | None] = []
        for op in ops:
            inst, local = self._localize(op)
            if isinstance(op, Reserve | Pin):
                if inst is None:
                    replies.extend(unanswered([op]))
                    continue
                slots.setdefault(inst, []).append(len(replies))
                replies.append(None)
            if inst is not None:
                batches.setdefault(inst, []).append(local)
        answers = await asyncio.gather(
            *(inst.store.tier.execute(batch) for inst, batch in batches.items()))
        for (inst, batch), answer in zip(batches.items(), answers, strict=True):
            for at, reply in zip(slots.get(inst, ()), self._globalize(inst, batch, answer),
                                 strict=True):
                replies[at] = reply
        return [r for r in replies if r is not None]

    def _localize(self, op: HostOp) -> tuple[_Instance | None, HostOp]:
        """The store `op` goes to (None: none is up, or nothing to send) and the op in that
        store's ids."""
        match op:
            case Reserve() | Pin():
                return self._route(op.conv), op
            case Commit() | Abort():
                inst, local = self._decode(op.reservation_id)
                return self._if_up(inst), replace(op, reservation_id=local)
            case Unpin():
                if op.pin_id == NO_PIN:
                    return None, op
                inst, local = self._decode(op.pin_id)
                return self._if_up(inst), Unpin(local)
            case Release():
                inst = self._route(op.conv)
                self._holders.pop(op.conv, None)
                return inst, op
        raise TypeError(f"not a host op: {op!r}")

    def _globalize(
        self, inst: _Instance, batch: Sequence[HostOp], replies: Sequence[HostReply]
    ) -> list[HostReply]:
        """The store's replies in global ids and blocks; remembers who holds what."""
        if self._by_slot.get(inst.slot) is not inst:
            return unanswered(batch)  # it left while the batch was out: forget its answer
        convs = {op.op_id: op.conv for op in batch if isinstance(op, Reserve | Pin)}
        out: list[HostReply] = []
        for reply in replies:
            conv = convs[reply.op_id]
            match reply:
                case Reserved(_, None):
                    out.append(reply)
                case Reserved(op_id, res):
                    self._remember(conv, inst)
                    out.append(Reserved(op_id, replace(
                        res,
                        reservation_id=self._global_id(inst, res.reservation_id),
                        valid_blocks=inst.to_global(res.valid_blocks),
                        new_blocks=inst.to_global(res.new_blocks),
                    )))
                case Pinned(op_id, hit, pin, held_by):
                    holder = self._by_id.get(held_by)
                    if holder is not None and holder.retry_at is None and (
                            hit.num_tokens or holder is not inst):
                        self._remember(conv, holder)
                    out.append(Pinned(
                        op_id,
                        Hit(hit.num_tokens, inst.to_global(hit.blocks)),
                        PinHandle(self._global_id(inst, pin.pin_id), inst.to_global(pin.blocks)),
                    ))
        return out

    @staticmethod
    def _if_up(inst: _Instance | None) -> _Instance | None:
        """None for a store that left or is down: its leases drop what is not sent."""
        return inst if inst is not None and inst.retry_at is None else None

    def _route(self, conv: str) -> _Instance | None:
        """The conversation's holder if it is up, else its rendezvous owner among the live."""
        holder = self._holders.get(conv)
        if holder is not None and holder.retry_at is None and \
                self._by_id.get(holder.instance_id) is holder:
            self._holders.move_to_end(conv)
            return holder
        live = self._live()
        if not live:
            return None
        owner = rendezvous_owner(conv, [inst.instance_id for inst in live])
        return self._by_id[owner]

    async def probe_down(self) -> list[StoreIdentity]:
        """Probes, all at once, each down store whose retry time has come. Returns the new
        identities of those that answer with a new arena: their driver replaces them."""
        now = self._clock()
        due = [inst for inst in self._instances
               if inst.retry_at is not None and inst.retry_at <= now]
        identities = await asyncio.gather(*(inst.store.client.describe() for inst in due))
        return [identity for inst, identity in zip(due, identities, strict=True)
                if self._probed(inst, identity) and identity is not None]

    async def remap(self, attach: Attach) -> bool:
        """`rebase` after `attach` (an executor's AttachHostArena: the first block, None if
        the arena is gone) of every store's arena, with no membership change between."""
        async with self.lock:
            return self.rebase({name: await attach(name) for name in self.arenas})

    def rebase(self, first_blocks: Mapping[str, int | None]) -> bool:
        """Follows a restarted executor that mapped the stores' arenas (by name) at these
        first blocks; True if any moved, which makes every host block id held stale. None:
        the arena is gone (its store restarted), so its store is down, and probed at once,
        until its driver replaces it. Stores whose arena is not named are left as they are."""
        moved = False
        for inst in self._instances:
            if inst.store.arena not in first_blocks:
                continue
            first = first_blocks[inst.store.arena]
            if first is None:
                inst.retry_at = self._clock()
                self._note_degraded()
                moved = True
            elif first != inst.store.first_block:
                inst.store = replace(inst.store, first_block=first)
                moved = True
        return moved

    def _live(self) -> list[_Instance]:
        return [inst for inst in self._instances if inst.retry_at is None]

    def _probed(self, inst: _Instance, identity: StoreIdentity | None) -> bool:
        """Back if it answered with its arena; True if it answered with another."""
        if identity == inst.store.identity:
            inst.retry_at = None
            self._note_degraded()
            log.info("KV store %s answers again; new conversations may go to it",
                     inst.instance_id)
            return False
        inst.retry_at = self._clock() + self.retry_s
        if identity is None:
            return False
        if not inst.moved_warned:
            inst.moved_warned = True
            log.warning("KV store %s restarted with arena %s instead of %s; it stays out "
                        "until the executor maps the new one", inst.instance_id,
                        identity.arena_name, inst.store.identity.arena_name)
        return identity.instance_id == inst.instance_id

    def _mark_down(self, inst: _Instance, why: str) -> None:
        if inst.retry_at is None:
            log.warning("KV store %s %s: its conversations recompute; probing it every "
                        "%.0f s", inst.instance_id, why, self.retry_s)
        inst.retry_at = self._clock() + self.retry_s
        self._note_degraded()

    def _note_degraded(self) -> None:
        """Follows `degraded` after a change that may have flipped it."""
        now = self._clock()
        if self.degraded and self._degraded_since is None:
            self._degraded_since = now
        elif not self.degraded and self._degraded_since is not None:
            self._degraded_total += now - self._degraded_since
            self._degraded_since = None

    def _remember(self, conv: str, inst: _Instance) -> None:
        self._holders[conv] = inst
        self._holders.move_to_end(conv)
        if len(self._holders) > self._max_holders:
            self._holders.popitem(last=False)

    @staticmethod
    def _global_id(inst: _Instance, local: int) -> int:
        return NO_PIN if local == NO_PIN else inst.slot << ID_BITS | local

    def _decode(self, global_id: int) -> tuple[_Instance | None, int]:
        return self._by_slot.get(global_id >> ID_BITS), global_id & LOCAL_MASK
