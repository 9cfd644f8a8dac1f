"""KV stores served in the test's own process and event loop, on a free port: what the
service, router, remote-tier and membership tests run their clients against."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc

from common.shm.arena import SHM_DIR
from protos import kvstore_pb2_grpc
from services.kvstore.assemble import open_store
from services.kvstore.config import StoreConfig
from services.kvstore.service import StoreServer
from services.scheduler.remote_host import RemoteHostKV, StoreIdentity


@dataclass(frozen=True)
class Geometry:
    num_blocks: int
    block_bytes: int
    block_size: int
    fingerprint: str


@dataclass
class InProcessStore:
    server: StoreServer
    channel: grpc.aio.Channel  # to it, insecure
    address: str
    stopped: bool = field(default=False, init=False)

    @property
    def stub(self) -> kvstore_pb2_grpc.KVStoreStub:
        return kvstore_pb2_grpc.KVStoreStub(self.channel)

    @property
    def identity(self) -> StoreIdentity:
        return StoreIdentity(self.server.store.instance_id, self.server.store.arena.name)

    def client(self, timeout_s: float = 5.0) -> RemoteHostKV:
        """The scheduler's tier of this store, as a driver opens it."""
        return RemoteHostKV(self.channel, self.identity,
                            fingerprint=self.server.store.fingerprint, timeout_s=timeout_s)

    async def stop(self) -> None:
        """Stops serving and unlinks the arena (a clean stop); idempotent."""
        if not self.stopped:
            self.stopped = True
            await self.server.stop(grace=0)


async def serve_store(geometry: Geometry, name: str, *, redis_url: str | None = None,
                      lease_seconds: float = 30.0, port: int = 0,
                      reap_interval: float | None = None) -> InProcessStore:
    """A store named `name` (instance id and arena base) serving on 127.0.0.1:`port`."""
    config = StoreConfig(
        host="127.0.0.1", port=port, redis_url=redis_url, num_blocks=geometry.num_blocks,
        block_bytes=geometry.block_bytes, block_size=geometry.block_size,
        fingerprint=geometry.fingerprint, arena_name=name, instance_id=name,
        lease_seconds=lease_seconds)
    server = StoreServer(open_store(config), reap_interval=reap_interval)
    bound = await server.start(f"127.0.0.1:{port}")
    address = f"127.0.0.1:{bound}"
    return InProcessStore(server, grpc.aio.insecure_channel(address), address)


@asynccontextmanager
async def store_starter(geometry: Geometry, prefix: str = "fastswitch-kvtest"
                        ) -> AsyncIterator[Callable[..., object]]:
    """`start(**serve_store kwargs)` starts the next store (`<prefix>-<random>-<k>`); all are
    stopped at the end, and none may leave an arena behind."""
    base = f"{prefix}-{uuid.uuid4().hex[:8]}"
    started: list[InProcessStore] = []

    async def start(**kwargs: object) -> InProcessStore:
        name = str(kwargs.pop("name", f"{base}-{len(started)}"))
        store = await serve_store(geometry, name, **kwargs)  # type: ignore[arg-type]
        started.append(store)
        return store

    try:
        yield start
    finally:
        for store in started:
            await store.channel.close()
            await store.stop()
    assert not list(SHM_DIR.glob(f"{base}*")), "a stopped store left its arena behind"
