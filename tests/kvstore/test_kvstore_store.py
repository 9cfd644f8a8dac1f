"""Behaviour of the KV store object, run against every index backend: memory, one Redis,
and a 3-master Redis Cluster (ids `redis-cluster`)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.kv.block_hash import block_hashes
from common.kv.extent import Extent, runs
from common.kv.host_ops import (
    MISS,
    NO_PIN,
    Abort,
    Commit,
    HostOp,
    Pin,
    Pinned,
    Release,
    Reserve,
    Reserved,
    Unpin,
)
from common.kv.reuse_index import (
    FingerprintMismatch,
    Hit,
    HostCapacityExhausted,
    Reservation,
)
from common.shm.arena import SHM_DIR
from services.kvstore.assemble import open_store
from services.kvstore.bulk import checksum
from services.kvstore.config import StoreConfig
from services.kvstore.errors import IndexUnavailable, InvalidRequest
from services.kvstore.leases import AbandonedRequest, NotOwner
from services.kvstore.redis_connect import redis_client
from services.kvstore.redis_storage import Namespace, RedisIndexStorage
from services.kvstore.store import BatchResult, KVStore, StoreRequest
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
    write = store.begin_write(CLIENT, reservation_id, extents)
    write.write(0, data, checksum(data))
    write.finish()


CLIENT = "scheduler-a"
_request_ids = itertools.count(1)


def call(store: KVStore, *ops: HostOp, client: str = CLIENT, **upkeep: Sequence[int]
         ) -> BatchResult:
    """One request of `client`'s, under a fresh request id."""
    return store.execute(FP, StoreRequest(client, next(_request_ids), ops, **upkeep))


def chain_of(tokens: list[int]) -> tuple[bytes, ...]:
    return tuple(block_hashes(tokens, BLOCK_SIZE, FP))


def reserve(store: KVStore, conv: str, tokens: list[int], client: str = CLIENT) -> Reservation:
    [reply] = call(store, Reserve(1, conv, chain_of(tokens), len(tokens)),
                   client=client).replies
    assert isinstance(reply, Reserved)
    if reply.reservation is None:
        raise HostCapacityExhausted
    return reply.reservation


def pin(store: KVStore, conv: str, tokens: list[int], client: str = CLIENT) -> Pinned:
    [reply] = call(store, Pin(1, conv, chain_of(tokens), len(tokens)), client=client).replies
    assert isinstance(reply, Pinned)
    return reply


def lookup(store: KVStore, conv: str, tokens: list[int]) -> Hit:
    """What the store holds valid of `tokens`, pinning nothing."""
    return store.index.lookup(conv, tokens)


def held(store: KVStore) -> tuple[int, int, int]:
    """Blocks used, blocks pinned, reservations pending."""
    s = store.stats()
    return s.used_blocks, s.pinned_blocks, s.pending_reservations


def put(store: KVStore, conv: str, tokens: list[int], seed: int) -> bytes:
    """Reserve, write the new blocks, commit; returns the bytes written."""
    res = reserve(store, conv, tokens)
    data = payload(len(res.new_blocks), seed)
    if res.new_blocks:
        write_all(store, res.reservation_id, res.new_extents, data)
    call(store, Commit(res.reservation_id))
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

    def make(instance_id: str = "a", num_blocks: int = NUM_BLOCKS,
             namespace: str = "") -> KVStore:
        config = StoreConfig(
            host="127.0.0.1", port=0, redis_url=redis_url, num_blocks=num_blocks,
            block_bytes=BLOCK_BYTES, block_size=BLOCK_SIZE, fingerprint=FP,
            arena_name=f"{arena_base}-{instance_id}", instance_id=f"{arena_base}-{instance_id}",
            lease_seconds=10.0, namespace=namespace,
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
    hit = pin(store, "c", tokens).hit
    assert hit.num_tokens == 10
    assert read_all(store, list(runs(hit.blocks))) == data
    longer = lookup(store, "c", [*tokens[:8], 99, 98, 97])
    assert longer.num_tokens == 8  # the partial block's hash covers its length
    assert longer.blocks == hit.blocks[:2]


def test_reservation_is_invisible_until_commit_and_abort_returns_blocks(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    res = reserve(store, "c", list(range(8)))
    assert lookup(store, "c", list(range(8))).num_tokens == 0
    assert store.stats().used_blocks == 2 and store.stats().pending_reservations == 1
    call(store, Abort(res.reservation_id))
    assert store.stats().used_blocks == 0 and store.stats().pending_reservations == 0
    call(store, Commit(res.reservation_id))  # aborted: skipped
    assert lookup(store, "c", list(range(8))).num_tokens == 0


def test_reserve_reuses_the_valid_prefix_and_counts_saved_bytes(make_store: StoreFactory) -> None:
    store = make_store()
    first = put(store, "c", list(range(8)), seed=1)
    res = reserve(store, "c", list(range(12)))
    assert res.valid_tokens == 8 and len(res.new_blocks) == 1
    tail = payload(1, seed=2)
    write_all(store, res.reservation_id, res.new_extents, tail)
    call(store, Commit(res.reservation_id))
    hit = pin(store, "c", list(range(12))).hit
    assert read_all(store, list(runs(hit.blocks))) == first + tail
    stats = store.stats()
    assert stats.bytes_saved_by_reuse == 2 * BLOCK_BYTES
    assert stats.hit_tokens == 8 + 12 and stats.miss_tokens == 8 + 4


def test_rejected_calls_change_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    data = put(store, "c", list(range(8)), seed=1)
    res = reserve(store, "d", list(range(100, 108)))
    committed = list(runs(lookup(store, "c", list(range(8))).blocks))
    before = store.stats()
    with pytest.raises(FingerprintMismatch):
        store.execute("other-model", StoreRequest(CLIENT, 10**9, [Release("c")]))
    with pytest.raises(InvalidRequest, match="client id"):
        store.execute(FP, StoreRequest("", 10**9, [Release("c")]))
    with pytest.raises(InvalidRequest, match="request ids start at 1"):
        store.execute(FP, StoreRequest(CLIENT, 0, [Release("c")]))
    with pytest.raises(InvalidRequest, match="exceeds"):
        store.read_blocks([Extent(NUM_BLOCKS - 1, 2)])
    with pytest.raises(InvalidRequest, match="not distinct new blocks"):
        store.begin_write(CLIENT, res.reservation_id, committed)  # committed: read-only
    with pytest.raises(NotOwner):
        store.begin_write("scheduler-b", res.reservation_id, res.new_extents)
    write = store.begin_write(CLIENT, res.reservation_id, res.new_extents)
    junk = b"\xff" * (2 * BLOCK_BYTES)
    with pytest.raises(InvalidRequest, match="checksum"):
        write.write(0, junk, checksum(junk) ^ 1)
    assert store.stats() == before
    assert read_all(store, committed) == data
    assert read_all(store, res.new_extents) != junk


def test_a_short_write_cannot_finish(make_store: StoreFactory) -> None:
    store = make_store()
    res = reserve(store, "c", list(range(8)))
    write = store.begin_write(CLIENT, res.reservation_id, res.new_extents)
    chunk = payload(1, seed=3)
    write.write(0, chunk, checksum(chunk))
    with pytest.raises(InvalidRequest, match="wrote 64 of the extents' 128 bytes"):
        write.finish()


def test_lru_eviction_takes_the_least_recently_used_tail(make_store: StoreFactory) -> None:
    store = make_store()
    put(store, "old", list(range(16)), seed=1)  # 4 blocks
    put(store, "new", list(range(100, 116)), seed=2)  # 4 blocks: the arena is full
    lookup(store, "old", list(range(16)))  # now "new" is least recently used
    put(store, "third", list(range(200, 208)), seed=3)  # needs 2 blocks
    assert lookup(store, "new", list(range(100, 116))).num_tokens == 8
    assert lookup(store, "old", list(range(16))).num_tokens == 16
    assert store.stats().evicted_blocks == 2


def test_no_room_when_everything_is_pinned_and_nothing_changes(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    put(store, "a", list(range(16)), seed=1)
    reserve(store, "b", list(range(100, 116)))
    pin(store, "a", list(range(16)))
    before = store.stats()
    assert call(store, Reserve(1, "c", chain_of([1]), 1)).replies == [Reserved(1, None)]
    assert store.stats() == before


def test_expired_leases_return_blocks_of_a_dead_client(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store()
    put(store, "a", list(range(8)), seed=1)
    res = reserve(store, "b", list(range(100, 108)))
    pinned = pin(store, "a", list(range(8)))
    clock.now += 5
    assert store.expire_leases() == 0
    clock.now += 6
    assert store.expire_leases() == 2
    stats = store.stats()
    assert (stats.used_blocks, stats.pinned_blocks, stats.pending_reservations) == (2, 0, 0)
    renewed = call(store, renew_reservations=[res.reservation_id], renew_pins=[pinned.pin.pin_id])
    assert (renewed.lapsed_reservations, renewed.lapsed_pins) == (
        (res.reservation_id,), (pinned.pin.pin_id,))
    call(store, Commit(res.reservation_id))  # lapsed: skipped
    assert lookup(store, "b", list(range(100, 108))).num_tokens == 0


def test_a_renewed_lease_outlives_its_first_term(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store()
    res = reserve(store, "b", list(range(8)))
    pinned = pin(store, "b", list(range(8)))
    for _ in range(3):
        clock.now += 8
        assert call(store, renew_reservations=[res.reservation_id],
                    renew_pins=[pinned.pin.pin_id]).lapsed_reservations == ()
        assert store.expire_leases() == 0
    call(store, Commit(res.reservation_id))
    clock.now += 100
    assert store.expire_leases() == 1  # the pin; the committed reservation is no lease
    assert lookup(store, "b", list(range(8))).num_tokens == 8


def test_another_clients_ops_on_a_reservation_are_refused_and_change_nothing(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    res = reserve(store, "c", list(range(8)), client="scheduler-a")
    pinned = pin(store, "c", list(range(8)), client="scheduler-a")
    before = store.stats()
    for op in (Abort(res.reservation_id), Commit(res.reservation_id), Unpin(pinned.pin.pin_id)):
        with pytest.raises(NotOwner):
            call(store, Release("c"), op, client="scheduler-b")
    with pytest.raises(NotOwner):
        call(store, renew_reservations=[res.reservation_id], client="scheduler-b")
    assert store.stats() == before
    call(store, Commit(res.reservation_id), client="scheduler-a")  # still its owner's
    assert lookup(store, "c", list(range(8))).num_tokens == 8


def test_a_repeated_request_is_answered_from_its_first_answer(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store()
    request = StoreRequest(CLIENT, 7, [Reserve(1, "c", chain_of(list(range(8))), 8)])
    first = store.execute(FP, request)
    assert store.execute(FP, request) is first  # not done twice
    assert store.stats().pending_reservations == 1
    other = store.execute(FP, StoreRequest("scheduler-b", 7, request.ops))  # not its id
    assert other is not first and store.stats().pending_reservations == 2
    clock.now += 11
    store.expire_leases()
    assert store.execute(FP, request) is not first  # a lease period later it is new
    assert store.stats().pending_reservations == 1


def test_an_abandoned_request_is_undone_or_refused_when_it_arrives(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    put(store, "a", list(range(8)), seed=1)
    quiet = held(store)
    made = StoreRequest(CLIENT, 100, [Reserve(1, "b", chain_of(list(range(8))), 8),
                                      Pin(2, "a", chain_of(list(range(8))), 8)])
    store.execute(FP, made)
    assert store.stats().pending_reservations == 1 and store.stats().pinned_blocks == 2
    call(store, abandon=[100, 101])  # 101 has not arrived yet
    assert held(store) == quiet
    with pytest.raises(AbandonedRequest):
        store.execute(FP, made)
    with pytest.raises(AbandonedRequest):
        store.execute(FP, StoreRequest(CLIENT, 101, made.ops))
    assert held(store) == quiet
    call(store, abandon=[100], client="scheduler-b")  # another client's id 100: its own
    assert held(store) == quiet


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 3), st.integers(1, 12)),
    st.tuples(st.just("pin"), st.integers(0, 3), st.integers(1, 12)),
    st.tuples(st.sampled_from(["commit", "abort", "unpin", "renew"]), st.integers(0, 20)),
    st.tuples(st.just("advance"), st.floats(0.0, 12.0)),
), max_size=40))
def test_leases_never_leak_and_committed_blocks_never_expire(
    arena_base: str, steps: list[tuple[object, ...]]
) -> None:
    """Ops of two clients interleaved with clock advances and expiry: every block is free,
    committed or held by a live lease; once every lease has lapsed, exactly the committed
    chains' blocks are used; a committed chain is never expired."""
    clock = FakeClock()
    factory = _factory(None, f"{arena_base}-{uuid.uuid4().hex[:6]}", clock)
    store = next(factory)(num_blocks=64)
    reservations: list[Reservation] = []
    pins: list[int] = []
    committed: dict[str, list[int]] = {}
    for step in steps:
        match step:
            case ("reserve", conv, n):
                try:
                    res = reserve(store, f"c{conv}", list(range(n)))
                except HostCapacityExhausted:
                    continue
                reservations.append(res)
            case ("pin", conv, n):
                pins.append(pin(store, f"c{conv}", list(range(n))).pin.pin_id)
            case ("commit", k) if reservations:
                res = reservations.pop(k % len(reservations))
                held = res.reservation_id in store._reservations
                call(store, Commit(res.reservation_id))
                if held and lookup(store, res.conversation, list(range(res.num_tokens))
                                   ).num_tokens == res.num_tokens:
                    committed[res.conversation] = list(range(res.num_tokens))
            case ("abort", k) if reservations:
                call(store, Abort(reservations.pop(k % len(reservations)).reservation_id))
            case ("unpin", k) if pins:
                call(store, Unpin(pins.pop(k % len(pins))))
            case ("renew", _):
                call(store, renew_reservations=[r.reservation_id for r in reservations],
                     renew_pins=pins)
            case ("advance", dt):
                clock.now += dt
                store.expire_leases()
        stats = store.stats()
        in_chains = sum(len(r.blocks) for _, r in store.index.storage.items())
        assert stats.used_blocks >= in_chains
        assert stats.pending_reservations <= len(reservations)
    clock.now += 10.0 + 1e-6
    store.expire_leases()
    stats = store.stats()
    assert (stats.pending_reservations, stats.pinned_blocks) == (0, 0)
    assert stats.used_blocks == sum(len(r.blocks) for _, r in store.index.storage.items())
    for conv, tokens in committed.items():  # nothing evicts: 64 blocks hold every chain
        assert lookup(store, conv, tokens).num_tokens == len(tokens)
    next(factory, None)


def test_concurrent_reserves_on_one_conversation_keep_the_index_whole(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    base = put(store, "c", list(range(8)), seed=1)
    one = reserve(store, "c", list(range(12)))
    two = reserve(store, "c", [*range(8), 50, 51, 52, 53, 54])
    tails = {}
    for res, seed in ((one, 10), (two, 20)):
        tails[res.reservation_id] = payload(len(res.new_blocks), seed)
        write_all(store, res.reservation_id, res.new_extents, tails[res.reservation_id])
    call(store, Commit(two.reservation_id))
    call(store, Commit(one.reservation_id))  # last commit wins; the other tail is freed
    hit = lookup(store, "c", list(range(12)))
    assert hit.num_tokens == 12
    assert read_all(store, list(runs(hit.blocks))) == base + tails[one.reservation_id]
    assert lookup(store, "c", [*range(8), 50, 51, 52, 53]).num_tokens == 8
    assert store.stats().used_blocks == 3


def test_release_frees_the_conversation(make_store: StoreFactory) -> None:
    store = make_store()
    put(store, "c", list(range(8)), seed=1)
    call(store, Release("c"))
    assert lookup(store, "c", list(range(8))).num_tokens == 0
    assert store.stats().used_blocks == 0


def test_a_batch_runs_in_order_and_its_pins_are_leases(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    store = make_store()
    first = call(store, Reserve(1, "c", chain_of(list(range(8))), 8),
                 Pin(2, "d", chain_of([7]), 1))
    [reserved, missed] = first.replies
    assert isinstance(reserved, Reserved) and reserved.reservation.new_blocks
    assert missed.hit == MISS and first.holders == {2: store.instance_id}
    rid = reserved.reservation.reservation_id
    second = call(store, Commit(rid), Pin(3, "c", chain_of(list(range(8))), 8),
                  Commit(rid), Abort(999), Unpin(12345), Unpin(NO_PIN))
    [pinned] = second.replies  # the double commit and the unknown ids are skipped
    assert pinned.hit == Hit(8, reserved.reservation.new_blocks)
    assert store.stats().pinned_blocks == 2
    clock.now += 11
    assert store.expire_leases() == 2  # both pins
    assert store.stats().pinned_blocks == 0
    assert call(store, Release("c")).replies == []
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
        call(store, *ops)
    with pytest.raises(FingerprintMismatch):
        store.execute("other-model", StoreRequest(CLIENT, 10**9, ops[:2]))
    assert store.stats() == before
    assert lookup(store, "c", list(range(8))).num_tokens == 8


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
    hit = lookup(restarted, "c", tokens)
    assert hit.num_tokens == 12
    assert read_all(restarted, list(runs(hit.blocks))) == data
    assert restarted.stats().used_blocks == 3
    assert not (SHM_DIR / old_segment).exists()  # an earlier epoch of its own: removed


def test_restart_drops_chains_whose_memory_is_gone(make_redis_store: StoreFactory) -> None:
    store = make_redis_store("a")
    put(store, "c", list(range(12)), seed=7)
    _crash(store)
    store.arena.unlink()  # the memory did not survive (a reboot wiped /dev/shm)
    restarted = make_redis_store("a")
    assert lookup(restarted, "c", list(range(12))).num_tokens == 0
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
    for step in (lambda: put(store, "c", tokens, seed=1),  # reserve + commit
                 lambda: pin(store, "c", tokens),
                 lambda: call(store, Release("c"))):
        before = round_trips()
        step()
        counts.append(round_trips() - before)
    assert counts == [1, 1, 1]  # a put (reserve writes nothing), a pin (a touch), a release
    next(factory, None)  # closes the store


def test_a_peer_whose_lease_ran_out_is_no_holder(make_redis_store: StoreFactory) -> None:
    a, b = make_redis_store("a"), make_redis_store("b")
    put(a, "c", list(range(8)), seed=1)
    a.backend.heartbeat("a:1", lease_s=-1.0)  # a crashed: its last lease is over
    assert call(b, Pin(1, "c", chain_of(list(range(8))), 8)).holders[1] == b.instance_id
    a.backend.heartbeat("a:1", lease_s=60.0)
    b.backend.registry.peer_ttl_s = 0.0  # read the registry again now
    assert call(b, Pin(1, "c", chain_of(list(range(8))), 8)).holders[1] == a.instance_id


def test_a_batch_pin_names_the_peer_that_holds_more(make_redis_store: StoreFactory) -> None:
    a, b = make_redis_store("a"), make_redis_store("b")
    put(a, "c", list(range(8)), seed=1)
    put(b, "c", list(range(4)), seed=2)  # b holds less of it
    result = call(b, Pin(1, "c", chain_of(list(range(8))), 8),
                  Pin(2, "c", chain_of(list(range(4))), 4))
    assert [r.hit.num_tokens for r in result.replies] == [4, 4]  # pinned here, on b
    assert result.holders == {1: a.instance_id, 2: b.instance_id}


def test_stacks_under_other_namespaces_never_see_each_others_stores(
    make_redis_store: StoreFactory, redis_url: str
) -> None:
    a, b = make_redis_store("a", namespace="stack-1"), make_redis_store("b", namespace="stack-2")
    put(a, "c", list(range(8)), seed=1)
    a.backend.heartbeat("a:1", lease_s=60.0)
    assert b.backend.registry.entries().keys() == {b.instance_id}
    assert call(b, Pin(1, "c", chain_of(list(range(8))), 8)).holders[1] == b.instance_id
    same = make_redis_store("c", namespace="stack-1")
    assert call(same, Pin(1, "c", chain_of(list(range(8))), 8)).holders[1] == a.instance_id
    client = redis_client(redis_url)
    assert client.exists(Namespace(FP, a.instance_id, "stack-1").chain("c"))
    assert not client.exists(Namespace(FP, a.instance_id).chain("c"))


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
            pin(store, "c", list(range(8)))
        with pytest.raises(IndexUnavailable):
            call(store, Release("c"))
        server.start()
        res = reserve(store, "d", list(range(100, 104)))  # Redis is back: it resyncs
        call(store, Commit(res.reservation_id))
        assert lookup(store, "c", list(range(8))).num_tokens == 8
        # Redis now holds exactly what the store does (the outage lost it all).
        mirror = RedisIndexStorage(redis.Redis(port=server.port), Namespace(FP, store.instance_id))
        assert dict(mirror.items()) == dict(store.index.storage.items())
        assert sorted(mirror.lru()) == ["c", "d"]
        next(factory, None)  # closes the store
    finally:
        server.start()  # back for the module's other tests
