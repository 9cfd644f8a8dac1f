"""Redis clients for an index URL: `redis://...` for one server, `redis+cluster://host:port`
for a Redis Cluster (any node; the rest are discovered).

Clients fail fast when Redis is down (one reconnect for a connection Redis dropped), so that
calls report UNAVAILABLE promptly instead of hanging.
"""

from __future__ import annotations

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from services.kvstore.redis_storage import AsyncRedisClient, RedisClient

CLUSTER_SCHEME = "redis+cluster://"
_TIMEOUTS = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0}


def is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://", CLUSTER_SCHEME))


def redis_client(url: str) -> RedisClient:
    """A blocking client; a cluster one reads the cluster's layout here."""
    if url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url(_plain(url), retry=Retry(NoBackoff(), 1), **_TIMEOUTS)
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), **_TIMEOUTS)


def async_redis_client(url: str) -> AsyncRedisClient:
    """An asyncio client; it connects on its first call."""
    if url.startswith(CLUSTER_SCHEME):
        return AsyncRedisCluster.from_url(_plain(url), retry=AsyncRetry(NoBackoff(), 1),
                                          **_TIMEOUTS)
    return redis.asyncio.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 1), **_TIMEOUTS)


def _plain(url: str) -> str:
    return "redis://" + url.removeprefix(CLUSTER_SCHEME)
