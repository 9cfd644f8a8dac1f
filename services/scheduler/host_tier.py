"""The host-tier interface: the async side that carries `common.kv.host_ops` out.

The planner hands out host ops (`HostOp`) and takes replies in (`HostReply`); it never
calls a tier. The engine's host worker hands each plan's ops to ONE tier, awaits its
replies and feeds them back, one plan at a time. A tier is anything that holds host KV in
arenas the executor maps and answers host ops about it:

- `LocalHost` (`local_host.py`): the embedded store, an index in this process;
- `RemoteHostKV` (`remote_host.py`): one KV store service whose arena the executor maps;
- `MirroredStore` (`remote_tier.py`): a tier in front of another whose arena the executor
  cannot map (a store on another host): the executor maps a local mirror, and the tier
  moves the bytes between the two around each Commit and Pin;
- `HostRouter` (`host_router.py`): many tiers, one per KV store, as one; it places each
  conversation on one of them and offsets their ids and blocks into one space.

Contract (what every tier promises its caller, the engine or a router):

- `execute(ops)` carries the ops out in the order given, after those of any earlier call
  that has returned, and answers exactly the `Reserve` and `Pin` ops, one reply each, in
  their order, with their `op_id`. It never raises: a tier that fails (its store cannot be
  reached, a byte transfer breaks) answers what it could not carry out as
  `host_ops.unanswered` (no room, nothing pinned), so the planner recomputes instead of
  failing requests; unanswered `Commit`, `Abort`, `Unpin` and `Release` are dropped (the
  next Pin finds less; the store's leases undo the rest). It is not called again before
  it returns.
- Host block ids in replies count blocks of `arenas`, concatenated in their order, from 0.
  The tier the engine drives must have them mapped as the executor's first arenas (then
  they are the executor's host block ids), unless it offsets them itself, as the router
  does for its members (a member of a router has exactly one arena).
- A reservation's blocks are visible to a `Pin` only after its `Commit`, and the caller
  commits only once the executor's copy into them has landed; a `Pin`'s blocks stay put
  until its `Unpin`, and the caller copies out of them only after the `Pinned` reply.
- `on_down(why)`, when the holder of a tier sets it, is called each time the tier finds it
  cannot serve: its store is unreachable, or answers from another arena than the one
  mapped. The router sets it on its members, marks the store down and probes it.
- `remap(attach)` follows a restarted executor: it has `attach` (an AttachHostArena: the
  arena's first block, None if it is gone) map each of `arenas` again and returns True if
  any landed elsewhere, which makes every host block id held stale.
- `renew()`, called every renew interval, extends the store leases of the reservations
  and pins the tier holds (a store frees what is not renewed, committed or released).
- `close()` releases what the tier owns (a mirror arena); the ops it was sent stay done.

A disk tier plugs in as a tier of its own, the way `MirroredStore` does: it owns a local
arena that the executor maps, an index of what it holds (a `ReuseIndex`, `host_ops.apply`
answering the ops), and moves blocks between the arena and files, reading a chain's
blocks in before it answers the `Pin` and writing them out after their `Commit`; a
failed read answers a miss. The scheduler's `--kvstore` choice builds it, alone (for the
engine) or as a member of a router.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence

from common.kv.host_ops import HostOp, HostReply

Attach = Callable[[str], Awaitable[int | None]]  # an arena's name -> its first block, or None


class HostTier(ABC):
    on_down: Callable[[str], None] | None = None

    @property
    @abstractmethod
    def arenas(self) -> tuple[str, ...]:
        """The arenas the executor maps for this tier, in attach order."""

    @abstractmethod
    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]:
        """Carries `ops` out; the replies to its Reserve and Pin ops (see the contract)."""

    @property
    def degraded(self) -> bool:
        """Some of its KV cannot be reached now: those conversations recompute."""
        return False

    @property
    def degraded_seconds(self) -> float:
        """Seconds it has been degraded, over its life."""
        return 0.0

    @property
    def store_counts(self) -> tuple[int, int]:
        """The KV store instances a router holds, and how many are down; (0, 0) else."""
        return (0, 0)

    async def remap(self, attach: Attach) -> bool:
        """Maps the arenas again; True if they moved. This default is for a tier of one
        arena that must be the executor's first."""
        [arena] = self.arenas
        return await attach(arena) != 0

    async def renew(self) -> None:
        """Extends the leases its stores hold on what it reserved and pinned there; the
        default holds nothing on lease."""

    def close(self) -> None:
        """Releases what the tier owns; the default owns nothing."""
