"""Builds a store from its config: the index backend, then the arena, then the store."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from services.kvstore.arena_setup import open_arena
from services.kvstore.backend import MemoryBackend, RedisBackend
from services.kvstore.config import StoreConfig
from services.kvstore.redis_storage import AsyncRedisClient, Namespace, RedisClient
from services.kvstore.store import KVStore

CLUSTER_SCHEME = "redis+cluster://"


def redis_clients(url: str) -> tuple[RedisClient, AsyncRedisClient]:
    """A blocking and an asyncio client for `url`: `redis://...` for one server,
    `redis+cluster://host:port` for a Redis Cluster (any node; the rest are discovered).

    Both fail fast when Redis is down (one reconnect for a connection Redis dropped), so
    that calls report UNAVAILABLE promptly instead of hanging."""
    timeouts = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0}
    if url.startswith(CLUSTER_SCHEME):
        plain = "redis://" + url.removeprefix(CLUSTER_SCHEME)
        return (
            RedisCluster.from_url(plain, retry=Retry(NoBackoff(), 1), **timeouts),
            AsyncRedisCluster.from_url(plain, retry=AsyncRetry(NoBackoff(), 1), **timeouts),
        )
    return (
        redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), **timeouts),
        redis.asyncio.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 1), **timeouts),
    )


def open_store(config: StoreConfig, clock: Callable[[], float] = time.monotonic) -> KVStore:
    backend: MemoryBackend | RedisBackend
    if config.redis_url:
        client, async_client = redis_clients(config.redis_url)
        backend = RedisBackend(
            client, Namespace(config.fingerprint, config.instance_id), async_client)
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
