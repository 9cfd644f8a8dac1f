"""Which store instances share a Redis index, and which of them holds a conversation.

Each instance registers the arena segment that backs its chains. A restarted instance
compares that name with the segment it could inherit: a mismatch means the memory behind
its chains is gone, and the chains must be dropped rather than served.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import redis

from common.kv.reuse_index import ChainRecord
from services.kvstore.errors import IndexUnavailable
from services.kvstore.redis_storage import Namespace, decode_record

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class InstanceEntry:
    instance_id: str
    arena_name: str
    host: str
    num_blocks: int
    block_bytes: int
    block_size: int


class InstanceRegistry:
    def __init__(self, client: redis.Redis, namespace: Namespace) -> None:
        self.client = client
        self.namespace = namespace

    def entries(self) -> dict[str, InstanceEntry]:
        raw = self._call(lambda: self.client.hgetall(self.namespace.registry))
        return {k.decode(): InstanceEntry(**json.loads(v)) for k, v in raw.items()}

    def own(self) -> InstanceEntry | None:
        return self.entries().get(self.namespace.instance_id)

    def register(self, entry: InstanceEntry) -> None:
        payload = json.dumps(asdict(entry))
        self._call(lambda: self.client.hset(self.namespace.registry, entry.instance_id, payload))

    def unregister(self) -> None:
        self._call(lambda: self.client.hdel(self.namespace.registry, self.namespace.instance_id))

    def peer_records(self, conv: str) -> list[tuple[str, ChainRecord]]:
        """The chains other registered instances hold for `conv`."""
        peers = [i for i in self.entries() if i != self.namespace.instance_id]
        if not peers:
            return []

        def read() -> list[bytes | None]:
            with self.client.pipeline(transaction=False) as pipe:
                for peer in peers:
                    pipe.hget(Namespace(self.namespace.fingerprint, peer).chains, conv)
                return pipe.execute()

        raws = self._call(read)
        return [(p, decode_record(r)) for p, r in zip(peers, raws, strict=True) if r]

    @staticmethod
    def _call(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.RedisError as e:
            raise IndexUnavailable(f"Redis registry unreachable: {e}") from e
