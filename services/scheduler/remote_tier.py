"""A KV store on another host, served to the executor through a local mirror arena.

The executor swaps KV by copying into a mapped arena. A store whose arena it cannot map
(AttachHostArena answers NOT_FOUND: the store runs on another host), or one the operator
sends over the network on purpose (`--kvstore-transport bulk`), gets a *mirror*: a local
arena of the store's geometry that the executor maps instead, block `b` of the mirror
standing for block `b` of the store. `MirroredStore` is the host tier in front of the
store's own (`RemoteHostKV`), whose ops it passes on, and moves the bytes with the
store's bulk API (WriteBlocks / ReadBlocks), so that the store never holds a chain whose
bytes it lacks and a swap-in never reads stale mirror bytes:

- Commit: the reservation's new blocks (the swap-out already landed in the mirror: the
  planner commits only after the copy) are pushed first; if the push fails, the Commit is
  sent as an Abort. A Commit of a reservation it did not see reserved is an Abort too.
- Pin: once the store answers, the pinned blocks are pulled into the mirror before the
  reply is returned (the planner swaps in only after it); if the pull fails, the pin is
  undone on the store and the reply is a miss.
- Everything else passes through, in order: pushes happen before the batch is sent and
  pulls after it is answered, so the ops' order on the store is the planner's.

`map_store` is the scheduler's choice between the two paths.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from enum import Enum

import grpc

from common.kv.extent import runs
from common.kv.host_ops import (
    MISS,
    NO_PIN,
    Abort,
    Commit,
    HostOp,
    HostReply,
    Pinned,
    Reserved,
    Unpin,
)
from common.kv.reuse_index import PinHandle
from common.shm.arena import HostArena
from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from services.kvstore.bulk import checksum, to_proto, write_chunks
from services.scheduler.host_router import RoutedStore
from services.scheduler.host_tier import HostTier
from services.scheduler.remote_host import RemoteHostKV

log = logging.getLogger("fastswitch.scheduler.kvstore")
# A bulk call's deadline: the store call's, plus the bytes at this slowest rate.
MIN_BULK_BYTES_PER_S = 50e6


class Transport(Enum):
    """How the executor reaches a store's blocks."""

    AUTO = "auto"  # map the store's arena; the bulk path only if it cannot be mapped
    BULK = "bulk"  # always the bulk path, even for a store on this host


class MirroredStore(HostTier):
    """The tier of `client`'s store, whose blocks the executor reads and writes in
    `mirror`; it owns the mirror (`close` unmaps and unlinks it)."""

    def __init__(
        self, client: HostTier, channel: grpc.aio.Channel, mirror: HostArena, *,
        timeout_s: float = 1.0, max_reservations: int = 1 << 16,
    ) -> None:
        self.client = client
        self.mirror = mirror
        self._stub = kv_grpc.KVStoreStub(channel)
        self._timeout = timeout_s
        # reservation id -> its new blocks, oldest first; bounded, because one that is never
        # committed (its Commit dropped while the store was down) only costs an Abort.
        self._reserved: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._max_reservations = max_reservations
        self._failing = False

    @property
    def on_down(self) -> Callable[[str], None] | None:
        """The store's own: it is the store that goes down."""
        return self.client.on_down

    @on_down.setter
    def on_down(self, callback: Callable[[str], None] | None) -> None:
        self.client.on_down = callback

    async def renew(self) -> None:
        await self.client.renew()

    @property
    def arenas(self) -> tuple[str, ...]:
        return (self.mirror.name,)

    async def execute(self, ops: Sequence[HostOp]) -> list[HostReply]:
        replies = await self.client.execute(await self._push_commits(ops))
        for reply in replies:  # none is reserved or pinned in those the store did not answer
            if isinstance(reply, Reserved) and reply.reservation is not None:
                self._remember(reply.reservation.reservation_id, reply.reservation.new_blocks)
        return await self._pull_pins(replies)

    def close(self) -> None:
        """Unmaps and unlinks the mirror (the executor's own mapping stays valid)."""
        self.mirror.close()
        self.mirror.unlink()

    async def _push_commits(self, ops: Sequence[HostOp]) -> list[HostOp]:
        """`ops`, each Commit whose blocks could not be pushed turned into an Abort."""
        commits: list[tuple[int, Commit, tuple[int, ...] | None]] = []
        for i, op in enumerate(ops):
            if isinstance(op, Commit | Abort):
                blocks = self._reserved.pop(op.reservation_id, None)
                if isinstance(op, Commit):
                    commits.append((i, op, blocks))
        pushed = await asyncio.gather(*(self._push(op.reservation_id, blocks)
                                        for _, op, blocks in commits))
        out = list(ops)
        for (i, op, _), ok in zip(commits, pushed, strict=True):
            if not ok:
                out[i] = Abort(op.reservation_id)
        return out

    async def _push(self, reservation_id: int, blocks: tuple[int, ...] | None) -> bool:
        """Writes the blocks' mirror bytes to the store; False if they did not all land."""
        if blocks is None:
            self._failed(f"commit of reservation {reservation_id}, never seen reserved")
            return False
        if not blocks:
            return True
        bb = self.mirror.block_bytes
        extents = list(runs(blocks))
        with self.mirror.view() as view:
            payload = b"".join(view[e.start * bb : (e.start + e.length) * bb] for e in extents)
        try:
            reply = await self._stub.WriteBlocks(
                write_chunks(self.client.client_id, reservation_id, extents, payload),
                timeout=self._deadline(len(payload)))
        except grpc.aio.AioRpcError as e:
            self._failed(f"WriteBlocks {e.code().name}: {e.details()}")
            return False
        if reply.bytes_written != len(payload):
            self._failed(f"WriteBlocks wrote {reply.bytes_written} of {len(payload)} bytes")
            return False
        self._failing = False
        return True

    async def _pull_pins(self, replies: list[HostReply]) -> list[HostReply]:
        """The replies, each pin whose blocks could not be pulled into the mirror undone on
        the store and answered as a miss."""
        pins = [i for i, r in enumerate(replies)
                if isinstance(r, Pinned) and r.pin.pin_id != NO_PIN and r.pin.blocks]
        pulled = await asyncio.gather(*(self._pull(replies[i].pin.blocks) for i in pins))
        failed = [i for i, ok in zip(pins, pulled, strict=True) if not ok]
        if not failed:
            return replies
        await self.client.execute([Unpin(replies[i].pin.pin_id) for i in failed])
        out = list(replies)
        for i in failed:
            out[i] = Pinned(replies[i].op_id, MISS, PinHandle(NO_PIN, ()))
        return out

    async def _pull(self, blocks: tuple[int, ...]) -> bool:
        """Reads the blocks from the store into the mirror at the same ids; False if any
        chunk is missing, misplaced or corrupt (the mirror may then hold some of them)."""
        bb = self.mirror.block_bytes
        total = len(blocks) * bb
        request = kv.ReadBlocksRequest(extents=to_proto(list(runs(blocks))))
        expected = 0
        call = self._stub.ReadBlocks(request, timeout=self._deadline(total))
        try:
            with self.mirror.view() as view:
                async for chunk in call:
                    if (chunk.offset != expected or expected + len(chunk.data) > total
                            or checksum(chunk.data) != chunk.crc32c):
                        call.cancel()
                        self._failed(f"ReadBlocks sent a bad chunk at offset {chunk.offset}")
                        return False
                    _scatter(view, blocks, bb, chunk.offset, chunk.data)
                    expected += len(chunk.data)
        except grpc.aio.AioRpcError as e:
            self._failed(f"ReadBlocks {e.code().name}: {e.details()}")
            return False
        if expected != total:
            self._failed(f"ReadBlocks sent {expected} of {total} bytes")
            return False
        self._failing = False
        return True

    def _deadline(self, nbytes: int) -> float:
        return self._timeout + nbytes / MIN_BULK_BYTES_PER_S

    def _remember(self, reservation_id: int, new_blocks: tuple[int, ...]) -> None:
        self._reserved[reservation_id] = new_blocks
        if len(self._reserved) > self._max_reservations:
            self._reserved.popitem(last=False)

    def _failed(self, why: str) -> None:
        if not self._failing:
            log.warning("kvstore bulk transfer failed (%s); those blocks recompute", why)
        self._failing = True


def _scatter(view: memoryview, blocks: Sequence[int], block_bytes: int, offset: int,
             data: bytes) -> None:
    """Writes `data`, found at `offset` of the blocks' concatenated bytes, into `view`."""
    data = memoryview(data)
    done = 0
    while done < len(data):
        index, within = divmod(offset + done, block_bytes)
        n = min(block_bytes - within, len(data) - done)
        at = blocks[index] * block_bytes + within
        view[at : at + n] = data[done : done + n]
        done += n


async def map_store(
    executor: ex_grpc.ExecutorStub, channel: grpc.aio.Channel, store: kv.DescribeResponse,
    client: RemoteHostKV, *, transport: Transport = Transport.AUTO, timeout_s: float = 1.0,
) -> RoutedStore:
    """Has the executor map the store's arena, or, if it cannot (NOT_FOUND) or `transport`
    says BULK, a mirror of it served over `channel`'s bulk API; `timeout_s` is the store
    call deadline that bulk calls extend by their size. Closing the result's tier unlinks
    a mirror."""
    if transport is Transport.AUTO:
        try:
            attached = await executor.AttachHostArena(ex.AttachHostArenaRequest(
                name=store.arena_name))
            return RoutedStore(client, attached.first_host_block)
        except grpc.aio.AioRpcError as e:
            if e.code() is not grpc.StatusCode.NOT_FOUND:
                raise
    mirror = HostArena.local(store.num_blocks, store.block_bytes)
    try:
        attached = await executor.AttachHostArena(ex.AttachHostArenaRequest(name=mirror.name))
    except BaseException:
        mirror.close()
        mirror.unlink()
        raise
    log.info("KV store %s (arena %s) is served over the gRPC bulk path via mirror %s "
             "(transport %s)", store.instance_id, store.arena_name, mirror.name,
             transport.value)
    return RoutedStore(client, attached.first_host_block,
                       MirroredStore(client, channel, mirror, timeout_s=timeout_s))
