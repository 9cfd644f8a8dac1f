"""Builds a store from its config: the index backend, then the arena, then the store."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.kvstore.arena_setup import open_arena
from services.kvstore.backend import MemoryBackend, RedisBackend
from services.kvstore.config import StoreConfig
from services.kvstore.redis_storage import Namespace
from services.kvstore.store import KVStore


def redis_client(url: str) -> redis.Redis:
    """Fails fast when Redis is down (one reconnect for a connection Redis dropped), so
    that calls report UNAVAILABLE promptly instead of hanging."""
    return redis.Redis.from_url(
        url, socket_timeout=2.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 1)
    )


def open_store(config: StoreConfig, clock: Callable[[], float] = time.monotonic) -> KVStore:
    backend: MemoryBackend | RedisBackend
    if config.redis_url:
        client = redis_client(config.redis_url)
        backend = RedisBackend(client, Namespace(config.fingerprint, config.instance_id))
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
