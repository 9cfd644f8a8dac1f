"""Where the store keeps its chains: in process (`memory`) or in a shared Redis (`redis`).

The store calls `sync` before and after each call: a Redis backend then reports an index
that other processes cannot see as unavailable, instead of silently diverging from it.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Protocol

from common.kv.reuse_index import ChainRecord, IndexStorage, MemoryIndexStorage
from common.shm.arena import HostArena
from services.kvstore.arena_setup import open_arena
from services.kvstore.errors import IndexUnavailable
from services.kvstore.redis_storage import (
    AsyncRedisClient,
    Namespace,
    RedisClient,
    RedisIndexStorage,
)
from services.kvstore.registry import InstanceEntry, InstanceRegistry


class IndexBackend(Protocol):
    name: str
    storage: IndexStorage

    def sync(self) -> None:
        """Sends the call's index writes (unless a `GroupCommit` does); raises
        IndexUnavailable when the shared index cannot be brought up to date."""

    def peer_records(self, conv: str) -> list[tuple[str, ChainRecord]]:
        """Chains other instances hold for `conv`, by instance id."""

    def close(self) -> None:
        """Withdraws this instance's chains: its arena is about to be unlinked."""


class MemoryBackend:
    name = "memory"

    def __init__(self) -> None:
        self.storage = MemoryIndexStorage()

    def sync(self) -> None:
        pass

    def peer_records(self, conv: str) -> list[tuple[str, ChainRecord]]:
        return []

    def close(self) -> None:
        pass


class RedisBackend:
    name = "redis"

    def __init__(
        self, client: RedisClient, namespace: Namespace, async_client: AsyncRedisClient
    ) -> None:
        """`async_client` is for a `GroupCommit`; whoever makes one closes it."""
        self.client = client
        self.async_client = async_client
        self.storage = RedisIndexStorage(client, namespace)
        self.registry = InstanceRegistry(client, namespace)
        self.entry: InstanceEntry | None = None  # set by open_arena

    def open_arena(
        self, base: str, num_blocks: int, block_bytes: int, block_size: int
    ) -> HostArena:
        """The arena, inheriting a crashed run's bytes if the chains point at them; chains
        whose memory did not survive are dropped, never served."""
        own = self.registry.own()
        arena, inherited = open_arena(
            base, num_blocks, block_bytes, inherit=own.arena_name if own else None
        )
        try:
            if not inherited or own is None or own.block_size != block_size:
                self.storage.clear()
            self.entry = InstanceEntry(
                instance_id=self.registry.namespace.instance_id,
                arena_name=arena.name,
                host=os.uname().nodename,
                num_blocks=num_blocks,
                block_bytes=block_bytes,
                block_size=block_size,
            )
            self.registry.register(self.entry)
        except BaseException:
            arena.unlink()
            arena.close()
            raise
        return arena

    def heartbeat(self, address: str, lease_s: float) -> None:
        """Renews this instance's entry: serving at `address` for `lease_s` more seconds.
        Raises IndexUnavailable."""
        if self.entry is None:
            raise RuntimeError("heartbeat before open_arena registered the instance")
        self.entry = replace(self.entry, address=address, lease_until=time.time() + lease_s)
        self.registry.register(self.entry)

    def sync(self) -> None:
        self.storage.ensure_synced()

    def peer_records(self, conv: str) -> list[tuple[str, ChainRecord]]:
        return self.registry.peer_records(conv)

    def close(self) -> None:
        try:
            self.storage.clear()
            self.registry.unregister()
        except IndexUnavailable:
            pass  # the next start finds the segment gone and drops the chains then
        finally:
            self.client.close()
