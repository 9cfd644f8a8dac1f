"""The Redis index on a 3-master Redis Cluster: one slot per conversation, and a master
that dies costs recomputes, never stale KV. (The behaviour suite in test_kvstore_store.py
also runs on the cluster.)"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import redis

from common.kv.extent import runs
from common.kv.host_ops import Pinned, Release
from services.kvstore.errors import IndexUnavailable
from services.kvstore.redis_connect import redis_client
from services.kvstore.redis_storage import Namespace, RedisIndexStorage
from services.kvstore.store import KVStore
from tests.kvstore import test_kvstore_store
from tests.kvstore.test_kvstore_store import (
    FP,
    FakeClock,
    StoreFactory,
    _factory,
    call,
    pin,
    put,
    read_all,
)
from tests.support.redis_server import RedisClusterServer

arena_base = test_kvstore_store.arena_base  # the fixture, shared

CONVERSATIONS = [f"conv-{i}" for i in range(12)]


@pytest.fixture
def make_cluster_store(
    redis_cluster: RedisClusterServer, arena_base: str
) -> Iterator[StoreFactory]:
    yield from _factory(redis_cluster.url, arena_base, FakeClock())


def test_cluster_keeps_a_conversation_in_one_slot_and_spreads_conversations(
    make_cluster_store: StoreFactory, redis_cluster: RedisClusterServer
) -> None:
    a, b = make_cluster_store("a", num_blocks=64), make_cluster_store("b", num_blocks=64)
    for conv in CONVERSATIONS:
        put(a, conv, list(range(8)), seed=1)
        put(b, conv, list(range(4)), seed=2)
    client = redis_client(redis_cluster.url)
    slot = lambda key: client.keyslot(key)  # noqa: E731
    for conv in CONVERSATIONS:
        keys = [Namespace(FP, s.instance_id).chain(conv) for s in (a, b)]
        assert client.exists(*keys) == 2
        assert slot(keys[0]) == slot(keys[1])  # a peer lookup reads one node
    masters = {redis_cluster.master_of(Namespace(FP, a.instance_id).chain(c)).port
               for c in CONVERSATIONS}
    assert len(masters) > 1


def test_cluster_master_dying_costs_recomputes_never_stale_kv(
    make_cluster_store: StoreFactory, redis_cluster: RedisClusterServer
) -> None:
    a, b = make_cluster_store("a", num_blocks=64), make_cluster_store("b", num_blocks=64)
    tokens = list(range(8))
    data = {conv: put(a, conv, tokens, seed=i) for i, conv in enumerate(CONVERSATIONS)}
    ns = Namespace(FP, a.instance_id)
    victim = redis_cluster.master_of(ns.chain(CONVERSATIONS[0]))
    on_victim = [c for c in CONVERSATIONS if redis_cluster.master_of(ns.chain(c)) is victim]
    victim.stop()
    try:
        outcomes = set()
        for conv in CONVERSATIONS:
            for store in (a, b):  # b finds a's chains through the index, or degrades
                try:
                    served = pin(store, conv, tokens)
                except IndexUnavailable:
                    outcomes.add("unavailable")
                    continue
                outcomes.add("served")
                assert_never_stale(a, b, store, served, data[conv])
        assert "unavailable" in outcomes  # the dead slots were noticed, not papered over
        # Writes go on in the mirror; conversations move on, and old blocks are reused.
        for conv in on_victim:
            with contextlib.suppress(IndexUnavailable):
                call(a, Release(conv))
    finally:
        victim.start()
        redis_cluster.wait_ok()
    # Back: the first call rewrites a's keys, after which Redis holds exactly its mirror.
    for _ in range(50):
        try:
            put(a, "after", list(range(4)), seed=99)
            break
        except IndexUnavailable:
            redis_cluster.wait_ok()
    else:
        pytest.fail("the store did not resync after the master came back")
    client = redis_client(redis_cluster.url)
    try:
        mirror = RedisIndexStorage(client, ns)
    finally:
        client.close()
    assert dict(mirror.items()) == dict(a.index.storage.items())
    for conv in CONVERSATIONS:
        for store in (a, b):
            assert_never_stale(a, b, store, pin(store, conv, tokens), data[conv])


def assert_never_stale(a: KVStore, b: KVStore, via: KVStore, served: Pinned,
                       data: bytes) -> None:
    """What `via` answered for a conversation `a` holds: `a`'s own bytes, whole, or a
    miss; from `b`, a miss naming `a` as the holder, or nobody (it degraded)."""
    if via is a and served.hit.num_tokens:
        assert served.hit.num_tokens == 8
        assert read_all(a, list(runs(served.hit.blocks))) == data  # never another's bytes
    elif via is b:
        assert served.hit.num_tokens == 0 and served.holder in ("", a.instance_id)


def test_cluster_url_names_any_node(redis_cluster: RedisClusterServer) -> None:
    node = redis_cluster.nodes[-1]
    client = redis_client(f"redis+cluster://127.0.0.1:{node.port}")
    try:
        assert len(client.get_primaries()) == len(redis_cluster.nodes)
        assert isinstance(redis_client(f"redis://127.0.0.1:{node.port}"), redis.Redis)
    finally:
        client.close()
