"""Behaviour of the KV store object, run against every index backend: memory, one Redis,
and a 3-master Redis Cluster (ids `redis-cluster`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis

from common.kv.block_hash import block_hashes
from common.kv.extent import Extent, flatten, runs
from common.kv.host_ops import (
    MISS,
    NO_PIN,
    Abort,
    Commit,
    HostOp,
    Pin,
    Release,
    Reserve,
    Reserved,
    Unpin,
)
from common.kv.reuse_index import (
    FingerprintMismatch,
    Hit,
    HostCapacityExhausted,
    UnknownPin,
    UnknownReservation,
)
from common.shm.arena import SHM_DIR
from services.kvstore.assemble import open_store
from services.kvstore.bulk import checksum
from services.kvstore.config import StoreConfig
from services.kvstore.errors import IndexUnavailable, InvalidRequest
from services.kvstore.redis_connect import redis_client
from services.kvstore.redis_storage import Namespace, RedisIndexStorage
from services.kvstore.store import KVStore
from tests.support.redis_server import RedisServer

FP = "model-a"
BLOCK_SIZE = 4
BLOCK_BYTES = 64
NUM_BLOCKS = 8


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def payload(blocks: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, blocks * BLOCK_BYTES, np.uint8).tobytes()


def read_all(store: KVStore, extents: list[Extent]) -> bytes:
    return b"".join(data for _, data in store.read_blocks(extents))


def write_all(store: KVStore, reservation_id: int, extents: list[Extent], data: bytes) -> None:
    write = store.begin_write(reservation_id, extents)
    write.write(0, data, checksum(data))
    write.finish()


def put(store: KVStore, conv: str, tokens: list[int], seed: int) -> bytes:
    """Reserve, write the new blocks, commit; returns the bytes written."""
    res = store.reserve(FP, conv, tokens)
    data = payload(len(res.new_blocks), seed)
    if res.new_blocks:
        write_all(store, res.reservation_id, res.new_extents, data)
    store.commit(res.reservation_id)
    return data


@pytest.fixture
def arena_base() -> Iterator[str]:
    base = f"fastswitch-kvtest-{uuid.uuid4().hex[:8]}"
    yield base
    for path in SHM_DIR.glob(f"{base}*"):
        path.unlink()


StoreFactory = Callable[..., KVStore]


def _factory(redis_url: str | None, arena_base: str, clock: FakeClock) -> Iterator[StoreFactory]:
    opened: list[KVStore] = []

    def make(instance_id: str = "a", num_blocks: int = NUM_BLOCKS) -> KVStore:
        config = StoreConfig(
            host="127.0.0.1", port=0, redis_url=redis_url, num_blocks=num_blocks,
            block_bytes=BLOCK_BYTES, block_size=BLOCK_SIZE, fingerprint=FP,
            arena_name=f"{arena_base}-{instance_id}", instance_id=f"{arena_base}-{instance_id}",
            lease_seconds=10.0,
        )
        store = open_store(config, clock=clock)
        opened.append(store)
        return store

    yield make
    for store in opened:
        if hasattr(store, "_bytes"):
            store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _index_url(request: pytest.FixtureRequest, backend: str) -> str | None:
    fixture = {"redis": "redis_server", "redis-cluster": "redis_cluster"}.get(backend)
    return request.getfixturevalue(fixture).url if fixture else None


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def make_store(
    request: pytest.FixtureRequest, arena_base: str, clock: FakeClock
) -> Iterator[StoreFactory]:
    yield from _factory(_index_url(request, request.param), arena_base, clock)


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    url = _index_url(request, request.param)
    assert url is not None
    return url


@pytest.fixture
def make_redis_store(redis_url: str, arena_base: str, clock: FakeClock) -> Iterator[StoreFactory]:
    yield from _factory(redis_url, arena_base, clock)


# --- behaviour suite: both backends ---------------------------------------------------


def test_committed_blocks_are_found_and_read_back(make_store: StoreFactory) -> None:
    store = make_store()
    tokens = list(range(10))  # 3 blocks, the last partial
    data = put(store, "c", tokens, seed=1)
    hit = store.lookup(FP, "c", tokens)
    assert hit.valid_tokens == 10 and hit.instance_id == store.instance_id
    assert read_all(store, hit.extents) == data
    longer = store.lookup(FP, "c", [*tokens[:8], 99, 98, 97])
    assert longer.valid_tokens == 8  # the partial block's hash covers its length
    assert flatten(longer.extents) == flatten(hit.extents)[:2]


def test_reservation_is_invisible_until_commit_and_abort_returns_blocks(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    res = store.reserve(FP, "c", list(range(8)))
    assert store.lookup(FP, "c", list(range(8))).valid_tokens == 0
    assert store.stats().used_blocks == 2 and store.stats().pending_reservations == 1
    store.abort(res.reservation_id)
    assert store.stats().used_blocks == 0 and store.stats().pending_reservations == 0
    with pytest.raises(UnknownReservation):
        store.commit(res.reservation_id)


def test_reserve_reuses_the_valid_prefix_and_counts_saved_bytes(make_store: StoreFactory) -> None:
    store = make_store()
    first = put(store, "c", list(range(8)), seed=1)
    res = store.reserve(FP, "c", list(range(12)))
    assert res.valid_tokens == 8 and len(res.new_blocks) == 1
    tail = payload(1, seed=2)
    write_all(store, res.reservation_id, res.new_extents, tail)
    store.commit(res.reservation_id)
    hit = store.lookup(FP, "c", list(range(12)))
    assert read_all(store, hit.extents) == first + tail
    stats = store.stats()
    assert stats.bytes_saved_by_reuse == 2 * BLOCK_BYTES
    assert stats.hit_tokens == 8 + 12 and stats.miss_tokens == 8 + 4


def test_rejected_calls_change_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    data = put(store, "c", list(range(8)), seed=1)
    res = store.reserve(FP, "d", list(range(100, 108)))
    committed = store.lookup(FP, "c", list(range(8))).extents
    before = store.stats()
    with pytest.raises(UnknownReservation):
        store.commit(res.reservation_id + 100)
    with pytest.raises(FingerprintMismatch):
        store.reserve("other-model", "c", list(range(12)))
    with pytest.raises(InvalidRequest, match="empty token list"):
        store.lookup(FP, "c", [])
    with pytest.raises(InvalidRequest, match="exceeds"):
        store.read_blocks([Extent(NUM_BLOCKS - 1, 2)])
    with pytest.raises(InvalidRequest, match="not distinct new blocks"):
        store.begin_write(res.reservation_id, committed)  # committed blocks are read-only
    write = store.begin_write(res.reservation_id, res.new_extents)
    junk = b"\xff" * (2 * BLOCK_BYTES)
    with pytest.raises(InvalidRequest, match="checksum"):
        write.write(0, junk, checksum(junk) ^ 1)
    assert store.stats() == before
    assert read_all(store, committed) == data
    assert read_all(store, res.new_extents) != junk
    store.commit(res.reservation_id)
    with pytest.raises(UnknownReservation):
        store.commit(res.reservation_id)  # a double commit


def test_a_short_write_cannot_finish(make_store: StoreFactory) -> None:
    store = make_store()
    res = store.reserve(FP, "c", list(range(8)))
    write = store.begin_write(res.reservation_id, res.new_extents)
    chunk = payload(1, seed=3)
    write.write(0, chunk, checksum(chunk))
    with pytest.raises(InvalidRequest, match="wrote 64 of the extents' 128 bytes"):
        write.finish()


def test_lru_eviction_takes_the_least_recently_used_tail(make_store: StoreFactory) -> None:
    store = make_store()
    put(store, "old", list(range(16)), seed=1)  # 4 blocks
    put(store, "new", list(range(100, 116)), seed=2)  # 4 blocks: the arena is full
    store.lookup(FP, "old", list(range(16)))  # now "new" is least recently used
    put(store, "third", list(range(200, 208)), seed=3)  # needs 2 blocks
    assert store.lookup(FP, "new", list(range(100, 116))).valid_tokens == 8
    assert store.lookup(FP, "old", list(range(16))).valid_tokens == 16
    assert store.stats().evicted_blocks == 2


def test_exhausted_when_everything_is_pinned_and_nothing_changes(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    put(store, "a", list(range(16)), seed=1)
    pending = store.reserve(FP, "b", list(range(100, 116)))
    store.pin(FP, "a", list(range(16)))
    before = store.stats()
    with pytest.raises(HostCapacityExhausted, match="need 1 host blocks: 0 free, 0 evictable"):
        store.reserve(FP, "c", [1])
    assert store.stats() == before
    store.abort(pending.reservation_id)


def test_expired_leases_return_blocks_of_a_dead_client(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store()
    put(store, "a", list(range(8)), seed=1)
    res = store.reserve(FP, "b", list(range(100, 108)))
    pin = store.pin(FP, "a", list(range(8)))
    clock.now += 5
    assert store.expire_leases() == 0
    clock.now += 6
    assert store.expire_leases() == 2
    stats = store.stats()
    assert (stats.used_blocks, stats.pinned_blocks, stats.pending_reservations) == (2, 0, 0)
    with pytest.raises(UnknownReservation):
        store.commit(res.reservation_id)
    with pytest.raises(UnknownPin, match="no pin"):
        store.unpin(pin.pin_id)


def test_concurrent_reserves_on_one_conversation_keep_the_index_whole(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    base = put(store, "c", list(range(8)), seed=1)
    one = store.reserve(FP, "c", list(range(12)))
    two = store.reserve(FP, "c", [*range(8), 50, 51, 52, 53, 54])
    tails = {}
    for res, seed in ((one, 10), (two, 20)):
        tails[res.reservation_id] = payload(len(res.new_blocks), seed)
        write_all(store, res.reservation_id, res.new_extents, tails[res.reservation_id])
    store.commit(two.reservation_id)
    store.commit(one.reservation_id)  # last commit wins; the other tail is freed
    hit = store.lookup(FP, "c", list(range(12)))
    assert hit.valid_tokens == 12
    assert read_all(store, hit.extents) == base + tails[one.reservation_id]
    assert store.lookup(FP, "c", [*range(8), 50, 51, 52, 53]).valid_tokens == 8
    assert store.stats().used_blocks == 3


def test_release_frees_the_conversation(make_store: StoreFactory) -> None:
    store = make_store()
    put(store, "c", list(range(8)), seed=1)
    store.release("c")
    assert store.lookup(FP, "c", list(range(8))).valid_tokens == 0
    assert store.stats().used_blocks == 0


def chain_of(tokens: list[int]) -> tuple[bytes, ...]:
    return tuple(block_hashes(tokens, BLOCK_SIZE, FP))


def test_chain_calls_are_the_token_calls(make_store: StoreFactory) -> None:
    by_tokens, by_chain = make_store("a"), make_store("b")
    tokens = list(range(10))
    put(by_tokens, "c", tokens, seed=1)
    res = by_chain.reserve_chain("c", chain_of(tokens), len(tokens))
    by_chain.commit(res.reservation_id)
    longer = [*tokens[:8], 50, 51, 52, 53]
    pinned = by_tokens.pin(FP, "c", longer)
    assert (pinned.valid_tokens, pinned.extents) == (8, list(runs(res.new_blocks[:2])))
    hit, handle = by_chain.pin_chain("c", chain_of(longer), len(longer))
    assert (hit.num_tokens, handle.blocks) == (8, res.new_blocks[:2])
    assert by_tokens.stats() == by_chain.stats()
    by_chain.unpin(handle.pin_id)
    with pytest.raises(UnknownPin):
        by_chain.unpin(handle.pin_id)


def test_a_batch_runs_in_order_and_its_pins_are_leases(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store()
    first = store.execute(FP, [Reserve(1, "c", chain_of(list(range(8))), 8),
                               Pin(2, "d", chain_of([7]), 1)])
    [reserved, missed] = first.replies
    assert isinstance(reserved, Reserved) and reserved.reservation.new_blocks
    assert missed.hit == MISS and first.holders == {2: store.instance_id}
    rid = reserved.reservation.reservation_id
    second = store.execute(FP, [Commit(rid), Pin(3, "c", chain_of(list(range(8))), 8),
                                Commit(rid), Abort(999), Unpin(12345), Unpin(NO_PIN)])
    [pinned] = second.replies  # the double commit and the unknown ids are skipped
    assert pinned.hit == Hit(8, reserved.reservation.new_blocks)
    assert store.stats().pinned_blocks == 2
    clock.now += 11
    assert store.expire_leases() == 2  # both pins
    assert store.stats().pinned_blocks == 0
    assert store.execute(FP, [Release("c")]).replies == []
    assert store.stats().used_blocks == 0


@pytest.mark.parametrize(("bad", "error", "match"), [
    (Reserve(9, "c", chain_of([1, 2, 3, 4, 5]), 4), InvalidRequest, "2 hashes for 4 tokens"),
    (Pin(9, "c", (b"x" * 15,), 4), InvalidRequest, "16 bytes"),
    (Pin(9, "", chain_of([1]), 1), InvalidRequest, "empty conversation"),
    (Reserve(9, "c", (), 0), InvalidRequest, "empty token list"),
    (Pin(1, "d", chain_of([1]), 1), InvalidRequest, "op id 1 repeats"),
    (Commit(0), InvalidRequest, "start at 1"),
    (Release(""), InvalidRequest, "empty conversation"),
])
def test_a_bad_batch_changes_nothing(
    make_store: StoreFactory, bad: HostOp, error: type[Exception], match: str
) -> None:
    store = make_store()
    put(store, "c", list(range(8)), seed=1)
    before = store.stats()
    ops = [Reserve(1, "e", chain_of(list(range(4))), 4), Release("c"), bad]
    with pytest.raises(error, match=match):
        store.execute(FP, ops)
    with pytest.raises(FingerprintMismatch):
        store.execute("other-model", ops[:2])
    assert store.stats() == before
    assert store.lookup(FP, "c", list(range(8))).valid_tokens == 8


# --- Redis only -----------------------------------------------------------------------


def _crash(store: KVStore) -> None:
    """Drop a store the way a crash would: no withdrawal, no unlink."""
    del store._bytes
    store.arena.close()


def test_restart_inherits_the_arena_of_a_crashed_run(make_redis_store: StoreFactory) -> None:
    store = make_redis_store("a")
    tokens = list(range(12))
    data = put(store, "c", tokens, seed=7)
    old_segment = store.arena.name
    _crash(store)
    restarted = make_redis_store("a")
    assert restarted.arena.name != old_segment
    hit = restarted.lookup(FP, "c", tokens)
    assert hit.valid_tokens == 12
    assert read_all(restarted, hit.extents) == data
    assert restarted.stats().used_blocks == 3
    assert not (SHM_DIR / old_segment).exists()  # an earlier epoch of its own: removed


def test_restart_drops_chains_whose_memory_is_gone(make_redis_store: StoreFactory) -> None:
    store = make_redis_store("a")
    put(store, "c", list(range(12)), seed=7)
    _crash(store)
    store.arena.unlink()  # the memory did not survive (a reboot wiped /dev/shm)
    restarted = make_redis_store("a")
    assert restarted.lookup(FP, "c", list(range(12))).valid_tokens == 0
    assert restarted.stats().used_blocks == 0


def test_clean_close_withdraws_the_chains(make_redis_store: StoreFactory, redis_url: str) -> None:
    store = make_redis_store("a")
    put(store, "c", list(range(8)), seed=1)
    ns = Namespace(FP, store.instance_id)
    client = redis_client(redis_url)
    assert client.exists(ns.chain("c")) and client.hexists(ns.registry, store.instance_id)
    store.close()
    assert not client.exists(ns.chain("c"))
    assert not client.hexists(ns.registry, store.instance_id)
    assert not list(SHM_DIR.glob(f"{store.arena.name}*"))


def test_each_call_is_one_redis_round_trip(
    redis_server: RedisServer, arena_base: str, clock: FakeClock
) -> None:
    """Counted as MULTI/EXEC transactions on one Redis (a cluster pipelines per node)."""
    factory = _factory(redis_server.url, arena_base, clock)
    store = next(factory)("a")
    client = redis.Redis(port=redis_server.port)

    def round_trips() -> int:
        return client.info("commandstats").get("cmdstat_exec", {}).get("calls", 0)

    tokens = list(range(12))
    counts = []
    for call in (lambda: put(store, "c", tokens, seed=1),  # reserve + commit
                 lambda: store.lookup(FP, "c", tokens),
                 lambda: store.release("c")):
        before = round_trips()
        call()
        counts.append(round_trips() - before)
    assert counts == [1, 1, 1]  # a put (reserve writes nothing), a lookup (a touch), a release
    next(factory, None)  # closes the store


def test_a_lookup_on_another_instance_is_attributed_to_the_holder(
    make_redis_store: StoreFactory,
) -> None:
    a, b = make_redis_store("a"), make_redis_store("b")
    put(a, "c", list(range(8)), seed=1)
    put(b, "c", list(range(4)), seed=2)  # b holds less of it
    hit = b.lookup(FP, "c", list(range(8)))
    assert (hit.valid_tokens, hit.instance_id) == (8, a.instance_id)
    assert hit.extents == a.lookup(FP, "c", list(range(8))).extents
    assert b.lookup(FP, "c", list(range(4))).instance_id == b.instance_id


def test_a_peer_whose_lease_ran_out_is_no_holder(make_redis_store: StoreFactory) -> None:
    a, b = make_redis_store("a"), make_redis_store("b")
    put(a, "c", list(range(8)), seed=1)
    a.backend.heartbeat("a:1", lease_s=-1.0)  # a crashed: its last lease is over
    assert b.lookup(FP, "c", list(range(8))).instance_id == b.instance_id
    a.backend.heartbeat("a:1", lease_s=60.0)
    b.backend.registry.peer_ttl_s = 0.0  # read the registry again now
    assert b.lookup(FP, "c", list(range(8))).instance_id == a.instance_id


def test_a_batch_pin_names_the_peer_that_holds_more(make_redis_store: StoreFactory) -> None:
    a, b = make_redis_store("a"), make_redis_store("b")
    put(a, "c", list(range(8)), seed=1)
    put(b, "c", list(range(4)), seed=2)  # b holds less of it
    result = b.execute(FP, [Pin(1, "c", chain_of(list(range(8))), 8),
                            Pin(2, "c", chain_of(list(range(4))), 4)])
    assert [r.hit.num_tokens for r in result.replies] == [4, 4]  # pinned here, on b
    assert result.holders == {1: a.instance_id, 2: b.instance_id}


def test_redis_outage_fails_calls_then_resyncs(
    redis_server: RedisServer, arena_base: str
) -> None:
    server = redis_server
    try:
        factory = _factory(server.url, arena_base, FakeClock())
        store = next(factory)("a")
        put(store, "c", list(range(8)), seed=1)
        server.stop()
        with pytest.raises(IndexUnavailable):
            store.lookup(FP, "c", list(range(8)))
        with pytest.raises(IndexUnavailable):
            store.release("c")
        server.start()
        res = store.reserve(FP, "d", list(range(100, 104)))  # Redis is back: it resyncs
        store.commit(res.reservation_id)
        assert store.lookup(FP, "c", list(range(8))).valid_tokens == 8
        # Redis now holds exactly what the store does (the outage lost it all).
        mirror = RedisIndexStorage(redis.Redis(port=server.port), Namespace(FP, store.instance_id))
        assert dict(mirror.items()) == dict(store.index.storage.items())
        assert sorted(mirror.lru()) == ["c", "d"]
        next(factory, None)  # closes the store
    finally:
        server.start()  # back for the module's other tests
