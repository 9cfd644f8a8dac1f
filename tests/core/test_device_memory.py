"""Device memory: the allocator, the swap manager and the device prefix cache as one object.
Units of each operation, and a stateful machine in which copies run under evictions,
takes and releases: accounting holds, no block under a copy is handed out, and a taker
gets only blocks whose tokens are its own."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from common.kv.block_hash import TokenChain
from services.scheduler.core.config import Mode, SchedulerConfig
from services.scheduler.core.device_cache import Cached
from services.scheduler.core.device_memory import DeviceMemory
from services.scheduler.core.request import Request
from services.scheduler.core.request_kv import Purpose
from services.scheduler.core.swaps import Swap
from tests.core.copies_in_flight import assert_never_handed_out, request_kv, touched

BS, BLOCKS = 4, 16
PICKS = st.integers(0, 1000)
KEYS = ("k0", "k1", "k2")
BASE = {k: [random.Random(k).randrange(50) for _ in range(BLOCKS * BS)] for k in KEYS}
_ids = itertools.count()


def memory(mode: Mode = Mode.VLLM_V1) -> DeviceMemory:
    return DeviceMemory(SchedulerConfig(mode=mode, block_size=BS, num_device_blocks=BLOCKS))


def hashes(tokens: list[int]) -> list[bytes]:
    return TokenChain(BS, "fp").hashes(tokens)


def holder(mem: DeviceMemory, blocks: int) -> Request:
    r = Request(f"r{next(_ids)}", "c", [1], 1)
    mem.allocate(r, blocks, expected=0)
    return r


def cached(mem: DeviceMemory, key: str) -> Cached:
    entry = next((e for e in mem.cache if e.key == key), None)
    assert entry is not None
    return entry


def copy_out(mem: DeviceMemory, r: Request, source: object, n: int, *, keep: bool) -> Swap:
    """A copy of `source`'s first `n` blocks to the host, for `r`."""
    purpose = Purpose.STORE if keep else Purpose.PREEMPT
    return mem.swaps.swap_out(r, request_kv(r.kv_key, BS), purpose, source=source, skip=0,
                              host_blocks=[next(_ids) for _ in range(n)],
                              reservation_id=next(_ids), keep=keep)


def test_cache_put_keeps_the_blocks_of_its_tokens_and_frees_the_rest() -> None:
    mem = memory()
    r = holder(mem, 5)
    table = mem.table(r)
    mem.cache_put(r, "k0", hashes(BASE["k0"][:9]), 9)
    assert mem.blocks_of(r) == 0
    assert mem.table(cached(mem, "k0")) == table[:3]
    assert mem.cached_blocks == 3 and mem.allocator.num_free == BLOCKS - 3


def test_cache_put_replaces_the_keys_older_entry_and_caches_nothing_for_no_tokens() -> None:
    mem = memory()
    first, second = holder(mem, 2), holder(mem, 3)
    mem.cache_put(first, "k0", hashes(BASE["k0"][:8]), 8)
    mem.cache_put(second, "k0", hashes(BASE["k0"][:12]), 12)
    assert [e.origin for e in mem.cache] == [second] and mem.cached_blocks == 3
    mem.cache_put(holder(mem, 2), "k1", [], 0)
    assert "k1" not in mem.cache and mem.allocator.num_used == 3


def test_take_hands_over_only_the_matching_prefix() -> None:
    mem = memory()
    r = holder(mem, 4)
    table = mem.table(r)
    mem.cache_put(r, "k0", hashes(BASE["k0"][:16]), 16)
    other = [99] * 4
    taker = Request("t", "c", [1], 1)
    mismatch = other + BASE["k0"][4:16]
    assert mem.cache_take("k0", hashes(mismatch), 16, taker) == 0
    assert "k0" in mem.cache and mem.blocks_of(taker) == 0  # nothing changed
    diverging = BASE["k0"][:9] + other
    assert mem.cache_take("k0", hashes(diverging), len(diverging), taker) == 8
    assert mem.table(taker) == table[:2] and "k0" not in mem.cache
    assert mem.allocator.num_used == 2


@pytest.mark.parametrize(("num_tokens", "usable"), [(16, 15), (12, 11), (5, 4), (4, 0)])
def test_usable_leaves_one_token_to_run_and_nothing_below_a_block(
    num_tokens: int, usable: int
) -> None:
    mem = memory()
    mem.cache_put(holder(mem, 4), "k0", hashes(BASE["k0"][:16]), 16)
    tokens = BASE["k0"][:num_tokens]
    assert mem.cache.usable("k0", hashes(tokens), num_tokens) == usable


def test_evict_frees_whole_entries_oldest_first() -> None:
    mem = memory()
    mem.cache_put(holder(mem, 2), "k0", hashes(BASE["k0"][:8]), 8)
    mem.cache_put(holder(mem, 3), "k1", hashes(BASE["k1"][:12]), 12)
    assert mem.evict(1) == 2
    assert [e.key for e in mem.cache] == ["k1"]
    assert mem.evict(BLOCKS) == 3 and mem.allocator.num_free == BLOCKS


def test_evict_drains_a_block_under_a_copy() -> None:
    mem = memory()
    r = holder(mem, 3)
    mem.cache_put(r, "k0", hashes(BASE["k0"][:12]), 12)
    offload = copy_out(mem, r, cached(mem, "k0"), 2, keep=True)
    assert mem.evict(BLOCKS) == 3
    assert mem.allocator.num_draining == 2
    assert_never_handed_out(mem.allocator, touched([offload.order]))
    mem.swaps.done(offload.order.swap_id)
    assert mem.allocator.num_free == BLOCKS


def test_grow_evicts_as_far_as_it_needs_and_fails_changing_nothing_else() -> None:
    mem = memory()
    r = holder(mem, 4)
    assert mem.grow(r, 3, longest=8) and mem.blocks_of(r) == 4  # it has them
    mem.cache_put(holder(mem, 4), "k0", hashes(BASE["k0"][:16]), 16)
    mem.cache_put(holder(mem, 4), "k1", hashes(BASE["k1"][:16]), 16)
    assert mem.grow(r, 10, longest=12)
    assert mem.blocks_of(r) == 10 and [e.key for e in mem.cache] == ["k1"]
    table = mem.table(r)
    assert not mem.grow(r, 17, longest=17)
    assert mem.table(r) == table and mem.cached_blocks == 0  # evicted, in vain


@pytest.mark.parametrize("mode", [Mode.FASTSWITCH, Mode.VLLM_V1])
def test_room_counts_the_free_the_draining_the_cached_and_the_residents(mode: Mode) -> None:
    mem = memory(mode)
    resident, other, gone = holder(mem, 3), holder(mem, 2), holder(mem, 4)
    mem.cache_put(holder(mem, 2), "k0", hashes(BASE["k0"][:8]), 8)
    copy_out(mem, gone, gone, 4, keep=False)
    assert mem.allocator.num_draining == 4
    assert mem.room([resident]) == BLOCKS - mem.blocks_of(other)
    assert mem.room([resident, other]) == BLOCKS


def test_reset_replaces_everything_and_hands_back_the_swaps_in_flight() -> None:
    mem = memory()
    r = holder(mem, 3)
    swap = copy_out(mem, r, r, 3, keep=True)
    mem.cache_put(holder(mem, 2), "k0", hashes(BASE["k0"][:8]), 8)
    allocator = mem.allocator
    assert mem.reset() == [swap]
    assert mem.allocator is not allocator and mem.swaps.allocator is mem.allocator
    assert len(mem.swaps) == 0 and not list(mem.cache)
    assert mem.allocator.num_free == BLOCKS


class DeviceMemoryMachine(RuleBasedStateMachine):
    """Requests holding a key's tokens (up to a point, then their own), cached, taken back,
    evicted, dropped and released, while copies out of them run and end in any order."""

    def __init__(self, mode: Mode) -> None:
        super().__init__()
        self.mem = memory(mode)
        self.tokens: dict[Request, tuple[str, list[int]]] = {}  # live holders: key, tokens
        self.entries: dict[str, list[int]] = {}  # key -> the tokens its entry holds
        self.flight: dict[int, Swap] = {}

    def _request(self, key: str, common: int, length: int) -> Request:
        """Tokens that are the key's for `common`, then the request's own."""
        r = Request(f"r{next(_ids)}", "c", [1], 1)
        own = [100 + next(_ids) for _ in range(length)]
        self.tokens[r] = (key, (BASE[key][:common] + own)[:length])
        return r

    def _holder(self, pick: int) -> Request:
        return list(self.tokens)[pick % len(self.tokens)]

    @rule(key=st.sampled_from(KEYS), common=st.integers(0, 24), length=st.integers(1, 24))
    def allocate(self, key: str, common: int, length: int) -> None:
        r = self._request(key, common, length)
        blocks = -(-length // BS)
        if not self.mem.grow(r, blocks, longest=blocks):
            del self.tokens[r]
        self._evicted()

    def _evicted(self) -> None:
        self.entries = {k: t for k, t in self.entries.items() if k in self.mem.cache}

    @precondition(lambda self: self.tokens)
    @rule(pick=PICKS)
    def release(self, pick: int) -> None:
        r = self._holder(pick)
        del self.tokens[r]
        self.mem.release(r)

    @precondition(lambda self: self.tokens)
    @rule(pick=PICKS, cut=st.integers(0, 24))
    def cache_put(self, pick: int, cut: int) -> None:
        r = self._holder(pick)
        key, tokens = self.tokens.pop(r)
        tokens = tokens[: min(cut, self.mem.blocks_of(r) * BS)]
        self.mem.cache_put(r, key, hashes(tokens), len(tokens))
        self.entries.pop(key, None)
        if tokens:
            self.entries[key] = tokens
        assert self.mem.blocks_of(r) == 0

    @rule(key=st.sampled_from(KEYS), common=st.integers(0, 24), length=st.integers(1, 24))
    def cache_take(self, key: str, common: int, length: int) -> None:
        r = self._request(key, common, length)
        _, tokens = self.tokens[r]
        before = self.mem.table(cached(self.mem, key)) if key in self.mem.cache else ()
        got = self.mem.cache_take(key, hashes(tokens), length, r)
        if not got:
            del self.tokens[r]
            return
        assert BS <= got < length
        assert tokens[:got] == self.entries.pop(key)[:got], "took another's KV"
        assert self.mem.table(r) == before[: -(-got // BS)]
        assert key not in self.mem.cache

    @rule(n=st.integers(0, BLOCKS))
    def evict(self, n: int) -> None:
        cached_before = self.mem.cached_blocks
        freed = self.mem.evict(n)
        assert freed >= min(n, cached_before) and self.mem.cached_blocks == cached_before - freed
        self._evicted()

    @rule(key=st.sampled_from(KEYS))
    def cache_drop(self, key: str) -> None:
        self.mem.cache_drop(key)
        self.entries.pop(key, None)

    @precondition(lambda self: self.tokens)
    @rule(pick=PICKS, n=st.integers(1, 6), keep=st.booleans())
    def copy_a_request_out(self, pick: int, n: int, keep: bool) -> None:
        r = self._holder(pick)
        swap = copy_out(self.mem, r, r, min(n, self.mem.blocks_of(r)), keep=keep)
        self.flight[swap.order.swap_id] = swap
        if not keep:
            del self.tokens[r]

    @precondition(lambda self: list(self.mem.cache))
    @rule(pick=PICKS, n=st.integers(1, 6))
    def copy_an_entry_out(self, pick: int, n: int) -> None:
        entry = list(self.mem.cache)[pick % len(list(self.mem.cache))]
        r = Request(f"r{next(_ids)}", "c", [1], 1)
        swap = copy_out(self.mem, r, entry, min(n, self.mem.blocks_of(entry)), keep=True)
        self.flight[swap.order.swap_id] = swap

    @precondition(lambda self: self.flight)
    @rule(pick=PICKS)
    def done(self, pick: int) -> None:
        swap_id = sorted(self.flight)[pick % len(self.flight)]
        assert self.mem.swaps.done(swap_id) is self.flight.pop(swap_id)

    @invariant()
    def accounting_holds_and_no_block_under_a_copy_is_handed_out(self) -> None:
        mem = self.mem
        assert_never_handed_out(mem.allocator, touched(s.order for s in self.flight.values()))
        assert mem.allocator.num_used == mem.cached_blocks + sum(map(mem.blocks_of, self.tokens))
        assert mem.room(self.tokens) == BLOCKS
        assert {e.key for e in mem.cache} == set(self.entries)

    def teardown(self) -> None:
        while self.flight:
            self.done(0)
        for r in list(self.tokens):
            self.mem.release(r)
        self.mem.evict(BLOCKS)
        allocator = self.mem.allocator
        assert (allocator.num_free, allocator.num_used, allocator.num_draining) == (BLOCKS, 0, 0)


@pytest.mark.parametrize("mode", [Mode.FASTSWITCH, Mode.VLLM_V1], ids=lambda m: m.value)
def test_device_memory_under_random_sequences(mode: Mode) -> None:
    run_state_machine_as_test(
        lambda: DeviceMemoryMachine(mode),
        settings=settings(max_examples=60, stateful_step_count=40, deadline=None),
    )
