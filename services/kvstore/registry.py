"""Which store instances share a Redis index, and which of them holds a conversation.

Each instance registers the arena segment that backs its chains. A restarted instance
compares that name with the segment it could inherit: a mismatch means the memory behind
its chains is gone, and the chains must be dropped rather than served.

A serving instance heartbeats its entry, with its address and a lease
(`RedisBackend.heartbeat`). Peer lookups read the list of live peers at most every
`peer_ttl_s` seconds: a peer that joined since is missed for that long (a missed hint
costs a recompute, never wrong KV).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TypeVar

import redis

from common.kv.reuse_index import ChainRecord
from services.kvstore.errors import IndexUnavailable
from services.kvstore.redis_storage import Namespace, RedisClient, decode_value

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class InstanceEntry:
    instance_id: str
    arena_name: str
    host: str
    num_blocks: int
    block_bytes: int
    block_size: int
    address: str = ""  # host:port it serves on, once serving
    lease_until: float = 0.0  # unix time its heartbeat last promised; 0: no lease

    def live(self, now: float) -> bool:
        return self.lease_until == 0.0 or self.lease_until > now

    def serving(self, now: float) -> bool:
        """Serving at its address, under a lease that holds: one a scheduler may use."""
        return bool(self.address) and self.lease_until > now


def parse_entries(raw: Mapping[bytes, bytes]) -> dict[str, InstanceEntry]:
    """The registry hash's entries by instance id; one that does not parse (another
    version's, say) is left out, as if its instance were not registered."""
    entries = {}
    for key, value in raw.items():
        try:
            entries[key.decode()] = InstanceEntry(**json.loads(value))
        except (ValueError, TypeError):
            continue
    return entries


class InstanceRegistry:
    """`clock` is wall time: leases are compared across hosts."""

    def __init__(
        self, client: RedisClient, namespace: Namespace, peer_ttl_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.peer_ttl_s = peer_ttl_s
        self._clock = clock
        self._peers: list[str] = []
        self._peers_read_at: float | None = None

    def entries(self) -> dict[str, InstanceEntry]:
        return parse_entries(self._call(lambda: self.client.hgetall(self.namespace.registry)))

    def own(self) -> InstanceEntry | None:
        return self.entries().get(self.namespace.instance_id)

    def register(self, entry: InstanceEntry) -> None:
        payload = json.dumps(asdict(entry))
        self._call(lambda: self.client.hset(self.namespace.registry, entry.instance_id, payload))

    def unregister(self) -> None:
        self._call(lambda: self.client.hdel(self.namespace.registry, self.namespace.instance_id))

    def peer_records(self, conv: str) -> list[tuple[str, ChainRecord]]:
        """The chains other registered instances hold for `conv`: one read, of one slot."""
        peers = self.peers()
        if not peers:
            return []
        keys = [self.namespace.chain(conv, peer) for peer in peers]
        raws = self._call(lambda: self.client.mget(keys))
        return [(p, decode_value(r)[1]) for p, r in zip(peers, raws, strict=True) if r]

    def peers(self) -> list[str]:
        """The other registered instances whose lease holds, as read at most `peer_ttl_s`
        ago: a crashed peer's chains stop being hints once its lease runs out."""
        now = self._clock()
        if self._peers_read_at is None or now - self._peers_read_at >= self.peer_ttl_s:
            self._peers = [i for i, e in self.entries().items()
                           if i != self.namespace.instance_id and e.live(now)]
            self._peers_read_at = now
        return self._peers

    @staticmethod
    def _call(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.RedisError as e:
            raise IndexUnavailable(f"Redis registry unreachable: {e}") from e
