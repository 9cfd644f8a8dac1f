"""The reuse index's chains in Redis (one server or a Redis Cluster), by model fingerprint,
conversation and store instance.

Each instance is the only writer of its chains, so it keeps an in-process mirror that is
authoritative for its own reads and writes. Changes are buffered (the last write of a key
wins) and sent by `flush` in one round trip: a MULTI/EXEC on a single Redis, a pipeline
split by node on a cluster. Every chain is one key, so a reader sees a conversation's chain
whole, old or new, never half of it. If a flush fails, the mirror stays consistent with the
arena and the index is marked out of date (`dirty`); the next flush rewrites this
instance's keys whole from the mirror. Until then callers report the index unavailable.

Layout: `fastswitch:kv:[<stack>:]{<fingerprint>:<conversation>}:<instance>` holds the
conversation's packed ChainRecord after its use counter (the LRU order). The hash tag puts
every instance's chain of one conversation in one cluster slot, so a peer lookup reads one
node. `<stack>` is the stack's namespace (`--kvstore-namespace`; none when empty): stacks
that share one Redis under different namespaces never see each other's chains or stores.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import redis
import redis.asyncio
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from common.kv.reuse_index import ChainRecord, MemoryIndexStorage
from services.kvstore.errors import IndexUnavailable

KEY_ROOT = "fastswitch:kv"
RedisClient = redis.Redis | RedisCluster
AsyncRedisClient = redis.asyncio.Redis | AsyncRedisCluster
Pipeline = (redis.client.Pipeline | redis.cluster.ClusterPipeline | redis.asyncio.client.Pipeline
            | redis.asyncio.cluster.ClusterPipeline)
SCAN_COUNT = 1000
_USE = struct.Struct("<Q")
_RECORD_HEAD = struct.Struct("<QIB")  # num_tokens, number of blocks, bytes per hash
_GLOB_SPECIAL = str.maketrans({c: f"\\{c}" for c in "*?[]\\"})
_STACK_NAME = re.compile(r"[A-Za-z0-9_.-]*")


def check_stack_namespace(stack: str) -> str:
    """`stack` if it is a valid stack namespace (letters, digits, `_`, `.`, `-`; may be
    empty), else ValueError."""
    if not _STACK_NAME.fullmatch(stack):
        raise ValueError(f"KV store namespace {stack!r}: use letters, digits, '_', '.', '-'")
    return stack


@dataclass(frozen=True, slots=True)
class Namespace:
    fingerprint: str
    instance_id: str
    stack: str = ""  # the stack's namespace; checked by check_stack_namespace

    @property
    def _root(self) -> str:
        return f"{KEY_ROOT}:{self.stack}:" if self.stack else f"{KEY_ROOT}:"

    def chain(self, conv: str, instance_id: str | None = None) -> str:
        """The key of `conv`'s chain held by `instance_id` (default: this instance)."""
        return f"{self._root}{{{self.fingerprint}:{conv}}}:{instance_id or self.instance_id}"

    @property
    def own_chains(self) -> str:
        """A SCAN pattern matching this instance's chain keys."""
        fp, inst = self.fingerprint.translate(_GLOB_SPECIAL), self.instance_id.translate(
            _GLOB_SPECIAL)
        return f"{self._root}{{{fp}:*}}:{inst}"

    def conv_of(self, key: str) -> str:
        head, tail = f"{self._root}{{{self.fingerprint}:", f"}}:{self.instance_id}"
        return key[len(head) : len(key) - len(tail)]

    @property
    def registry(self) -> str:
        """Shared by every instance of this stack serving this fingerprint."""
        return f"{self._root}{{{self.fingerprint}}}:instances"


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


def decode_value(raw: bytes) -> tuple[int, ChainRecord]:
    """A chain key's value: (use counter, record)."""
    return _USE.unpack_from(raw)[0], decode_record(raw[_USE.size :])


def is_cluster(client: RedisClient | AsyncRedisClient) -> bool:
    return isinstance(client, RedisCluster | AsyncRedisCluster)


@dataclass(frozen=True, slots=True)
class Writes:
    """One flush: key -> value (None deletes); `rewrite` replaces all of the instance's keys."""

    values: dict[str, bytes | None]
    rewrite: bool

    def with_deletions(self, held: Iterable[bytes]) -> dict[str, bytes | None]:
        """The values, plus a deletion of each `held` key a rewrite does not set."""
        values = dict(self.values)
        for key in held:
            values.setdefault(key.decode(), None)
        return values


def queue(pipe: Pipeline, values: dict[str, bytes | None]) -> None:
    """Queues a flush's writes on a pipeline (sync or asyncio, single or cluster)."""
    for key, value in values.items():
        if value is None:
            pipe.delete(key)
        else:
            pipe.set(key, value)


class RedisIndexStorage:
    """`IndexStorage` over Redis, with a local mirror; see the module docstring.

    `take_writes`, `send` and `settle` are a flush, in steps that a `GroupCommit` (when
    `deferred`) carries out with an asyncio client instead."""

    def __init__(self, client: RedisClient, namespace: Namespace) -> None:
        self.client = client
        self.namespace = namespace
        self.deferred = False
        self._local = MemoryIndexStorage()
        self._use: dict[str, int] = {}
        self._pending: dict[str, bytes | None] = {}
        self._dirty = False
        self.staged = 0  # writes buffered so far: a call that left it unchanged wrote nothing
        try:
            keys = list(client.scan_iter(match=namespace.own_chains, count=SCAN_COUNT))
            with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                raws = pipe.execute()
        except redis.RedisError as e:
            raise IndexUnavailable(f"cannot load index from Redis: {e}") from e
        loaded = sorted(
            ((*decode_value(raw), namespace.conv_of(key.decode()))
             for key, raw in zip(keys, raws, strict=True) if raw),
            key=lambda loaded: loaded[0],
        )
        for use, record, conv in loaded:
            self._local.put(conv, record)
            self._use[conv] = use
        self._uses = itertools.count(loaded[-1][0] + 1 if loaded else 1)

    @property
    def dirty(self) -> bool:
        """Redis lags the mirror: a flush failed and no rewrite has succeeded since."""
        return self._dirty

    @property
    def has_writes(self) -> bool:
        """A flush would send something."""
        return self._dirty or bool(self._pending)

    def get(self, conv: str) -> ChainRecord | None:
        return self._local.get(conv)

    def put(self, conv: str, record: ChainRecord) -> None:
        self._local.put(conv, record)
        self._use[conv] = next(self._uses)
        self._stage(conv, record)

    def replace(self, conv: str, record: ChainRecord) -> None:
        self._local.replace(conv, record)
        self._stage(conv, record)

    def delete(self, conv: str) -> None:
        self._local.delete(conv)
        self._use.pop(conv, None)
        self._pending[self.namespace.chain(conv)] = None
        self.staged += 1

    def touch(self, conv: str) -> None:
        record = self._local.get(conv)
        if record is None:
            return
        self._local.touch(conv)
        self._use[conv] = next(self._uses)
        self._stage(conv, record)

    def lru(self) -> list[str]:
        return self._local.lru()

    def items(self) -> Iterable[tuple[str, ChainRecord]]:
        return self._local.items()

    def clear(self) -> None:
        """Forgets every chain of this instance (its arena did not survive)."""
        for conv in self._local.lru():
            self.delete(conv)
        self._dirty = True
        self.ensure_synced()

    def ensure_synced(self) -> None:
        """Flushes the buffered writes (unless `deferred`); raises IndexUnavailable if Redis
        lags the mirror afterwards."""
        if self.deferred:
            if self._dirty:
                raise IndexUnavailable("Redis index unreachable; it is rewritten on recovery")
            return
        writes = self.take_writes()
        if writes is None:
            return
        try:
            self.send(writes)
        except redis.RedisError as e:
            self.settle(writes, landed=False)
            raise IndexUnavailable(f"Redis index unreachable: {e}") from e
        self.settle(writes, landed=True)

    def take_writes(self) -> Writes | None:
        """What the next flush must send (None: Redis is up to date)."""
        if self._dirty:
            self._pending = {}
            values: dict[str, bytes | None] = {
                self.namespace.chain(c): _USE.pack(self._use[c]) + encode_record(r)
                for c, r in self._local.items()
            }
            return Writes(values, rewrite=True)
        if not self._pending:
            return None
        writes, self._pending = Writes(self._pending, rewrite=False), {}
        return writes

    def send(self, writes: Writes) -> None:
        """One round trip (two for a rewrite, which first lists the keys); raises RedisError."""
        held = (
            self.client.scan_iter(match=self.namespace.own_chains, count=SCAN_COUNT)
            if writes.rewrite else ()
        )
        values = writes.with_deletions(held)
        with self.client.pipeline(transaction=not is_cluster(self.client)) as pipe:
            queue(pipe, values)
            pipe.execute()

    def settle(self, writes: Writes, *, landed: bool) -> None:
        """Records a flush's outcome."""
        if not landed:
            self._dirty = True
        elif writes.rewrite:
            self._dirty = False

    def _stage(self, conv: str, record: ChainRecord) -> None:
        self._pending[self.namespace.chain(conv)] = _USE.pack(self._use[conv]) + encode_record(
            record)
        self.staged += 1
