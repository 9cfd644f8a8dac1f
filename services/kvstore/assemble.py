"""Builds a store from its config: the index backend, then the arena, then the store."""

from __future__ import annotations

import time
from collections.abc import Callable

from services.kvstore.arena_setup import open_arena
from services.kvstore.backend import MemoryBackend, RedisBackend
from services.kvstore.config import StoreConfig
from services.kvstore.redis_connect import async_redis_client, redis_client
from services.kvstore.redis_storage import Namespace
from services.kvstore.store import KVStore


def open_store(config: StoreConfig, clock: Callable[[], float] = time.monotonic) -> KVStore:
    backend: MemoryBackend | RedisBackend
    if config.redis_url:
        backend = RedisBackend(
            redis_client(config.redis_url),
            Namespace(config.fingerprint, config.instance_id, config.namespace),
            async_redis_client(config.redis_url))
        arena = backend.open_arena(
            config.arena_name, config.num_blocks, config.block_bytes, config.block_size
        )
    else:
        backend = MemoryBackend()
        arena, _ = open_arena(config.arena_name, config.num_blocks, config.block_bytes)
    return KVStore(
        instance_id=config.instance_id,
        fingerprint=config.fingerprint,
        block_size=config.block_size,
        arena=arena,
        backend=backend,
        lease_seconds=config.lease_seconds,
        clock=clock,
    )
