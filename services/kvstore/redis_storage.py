"""The reuse index's chains in Redis, namespaced by model fingerprint and store instance.

Each instance is the only writer of its namespace, so it keeps an in-process mirror that is
authoritative for its own reads and writes every change through to Redis in one MULTI/EXEC
transaction (a reader never sees half a chain). If Redis fails mid-call, the mirror stays
consistent with the arena and the namespace is marked out of date; `ensure_synced` rewrites
it whole, atomically, once Redis answers again. Until then callers report the index
unavailable.

Layout: `<ns>:chains` is a hash conversation -> packed ChainRecord, `<ns>:lru` a sorted set
conversation -> use counter, where `<ns>` is `fastswitch:kv:<fingerprint>:<instance>`.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from common.kv.reuse_index import ChainRecord, MemoryIndexStorage
from services.kvstore.errors import IndexUnavailable

KEY_ROOT = "fastswitch:kv"
_RECORD_HEAD = struct.Struct("<QIB")  # num_tokens, number of blocks, bytes per hash


@dataclass(frozen=True, slots=True)
class Namespace:
    fingerprint: str
    instance_id: str

    @property
    def chains(self) -> str:
        return f"{KEY_ROOT}:{self.fingerprint}:{self.instance_id}:chains"

    @property
    def lru(self) -> str:
        return f"{KEY_ROOT}:{self.fingerprint}:{self.instance_id}:lru"

    @property
    def registry(self) -> str:
        """Shared by every instance serving this fingerprint."""
        return f"{KEY_ROOT}:{self.fingerprint}:instances"


def encode_record(record: ChainRecord) -> bytes:
    hash_len = len(record.hashes[0]) if record.hashes else 0
    return b"".join(
        [
            _RECORD_HEAD.pack(record.num_tokens, len(record.blocks), hash_len),
            *record.hashes,
            struct.pack(f"<{len(record.blocks)}I", *record.blocks),
        ]
    )


def decode_record(raw: bytes) -> ChainRecord:
    num_tokens, n, hash_len = _RECORD_HEAD.unpack_from(raw)
    at = _RECORD_HEAD.size
    hashes = tuple(raw[at + i * hash_len : at + (i + 1) * hash_len] for i in range(n))
    blocks = struct.unpack_from(f"<{n}I", raw, at + n * hash_len)
    return ChainRecord(hashes, blocks, num_tokens)


Pipeline = redis.client.Pipeline


class RedisIndexStorage:
    """`IndexStorage` over Redis, with a local mirror; see the module docstring."""

    def __init__(self, client: redis.Redis, namespace: Namespace) -> None:
        self.client = client
        self.namespace = namespace
        self._local = MemoryIndexStorage()
        self._dirty = False
        try:
            with client.pipeline(transaction=True) as pipe:
                pipe.hgetall(namespace.chains)
                pipe.zrange(namespace.lru, 0, -1, withscores=True)
                raw_chains, order = pipe.execute()
        except redis.RedisError as e:
            raise IndexUnavailable(f"cannot load index from Redis: {e}") from e
        for conv, _ in order:
            if conv in raw_chains:
                self._local.put(conv.decode(), decode_record(raw_chains[conv]))
        self._uses = itertools.count(int(order[-1][1]) + 1 if order else 1)

    @property
    def dirty(self) -> bool:
        """Redis lags the mirror: a write failed and no resync has succeeded since."""
        return self._dirty

    def get(self, conv: str) -> ChainRecord | None:
        return self._local.get(conv)

    def put(self, conv: str, record: ChainRecord) -> None:
        self._local.put(conv, record)
        use = next(self._uses)
        self._write(
            lambda p: p.hset(self.namespace.chains, conv, encode_record(record)).zadd(
                self.namespace.lru, {conv: use}
            )
        )

    def replace(self, conv: str, record: ChainRecord) -> None:
        self._local.replace(conv, record)
        self._write(lambda p: p.hset(self.namespace.chains, conv, encode_record(record)))

    def delete(self, conv: str) -> None:
        self._local.delete(conv)
        self._write(lambda p: p.hdel(self.namespace.chains, conv).zrem(self.namespace.lru, conv))

    def touch(self, conv: str) -> None:
        if self._local.get(conv) is None:
            return
        self._local.touch(conv)
        use = next(self._uses)
        self._write(lambda p: p.zadd(self.namespace.lru, {conv: use}))

    def lru(self) -> list[str]:
        return self._local.lru()

    def items(self) -> Iterable[tuple[str, ChainRecord]]:
        return self._local.items()

    def clear(self) -> None:
        """Forgets every chain of this instance (its arena did not survive)."""
        for conv in self._local.lru():
            self._local.delete(conv)
        self._dirty = True
        self.ensure_synced()

    def ensure_synced(self) -> None:
        """Brings Redis up to the mirror if it lags; raises IndexUnavailable if it can't."""
        if not self._dirty:
            return
        ns = self.namespace
        records = list(self._local.items())
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(ns.chains, ns.lru)
                if records:
                    pipe.hset(ns.chains, mapping={c: encode_record(r) for c, r in records})
                    pipe.zadd(ns.lru, {c: next(self._uses) for c, _ in records})
                pipe.execute()
        except redis.RedisError as e:
            raise IndexUnavailable(f"Redis index unreachable: {e}") from e
        self._dirty = False

    def _write(self, ops: Callable[[Pipeline], object]) -> None:
        if self._dirty:
            return  # the next ensure_synced writes the whole namespace
        try:
            with self.client.pipeline(transaction=True) as pipe:
                ops(pipe)
                pipe.execute()
        except redis.RedisError:
            self._dirty = True
