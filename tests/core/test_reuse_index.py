"""ReuseIndex: the two-phase put, prefix matching, pins, eviction, and host block accounting."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from common.kv import reuse_index
from common.kv.block_hash import TokenChain, block_hashes
from common.kv.extent import flatten
from common.kv.reuse_index import (
    FingerprintMismatch,
    Hit,
    HostCapacityExhausted,
    MemoryIndexStorage,
    Reservation,
    ReuseIndex,
    StaleReservation,
    UnknownReservation,
)

BS = 4  # tokens per block
MODEL = "tiny-llama@abc123"


def _index(num_blocks: int = 16, storage: MemoryIndexStorage | None = None) -> ReuseIndex:
    return ReuseIndex(fingerprint=MODEL, block_size=BS, num_blocks=num_blocks, storage=storage)


def _tokens(n: int, *, offset: int = 0) -> list[int]:
    return list(range(offset, offset + n))


def _put(index: ReuseIndex, conv: str, tokens: Sequence[int]) -> Reservation:
    res = index.reserve(conv, tokens)
    index.commit(res.reservation_id)
    return res


def _free_blocks(index: ReuseIndex) -> set[int]:
    return set(flatten(index._free))


def _state(index: ReuseIndex) -> tuple[object, ...]:
    return dict(index.storage.items()), _free_blocks(index), dict(index._pins), index.stats()


# --- two-phase put --------------------------------------------------------------------------


def test_reserved_blocks_are_invisible_until_commit() -> None:
    index = _index()
    tokens = _tokens(10)
    res = index.reserve("a", tokens)
    assert (res.valid_tokens, res.valid_blocks, len(res.new_blocks)) == (0, (), 3)
    assert index.lookup("a", tokens) == Hit(0, ())
    assert index.stats().used == 3
    index.commit(res.reservation_id)
    assert index.lookup("a", tokens) == Hit(10, res.new_blocks)


def test_abort_drops_the_reservation_and_frees_its_blocks() -> None:
    index = _index(4)
    res = index.reserve("a", _tokens(16))
    index.abort(res.reservation_id)
    assert index.lookup("a", _tokens(16)) == Hit(0, ())
    assert index.stats().used == 0
    assert len(index.reserve("b", _tokens(16)).new_blocks) == 4


def test_abort_of_an_extension_keeps_the_committed_prefix_evictable() -> None:
    index = _index(4)
    first = _put(index, "a", _tokens(8))
    ext = index.reserve("a", _tokens(12))
    assert (ext.valid_tokens, ext.valid_blocks, len(ext.new_blocks)) == (8, first.new_blocks, 1)
    assert index.stats().pinned == 2
    index.abort(ext.reservation_id)
    assert index.stats().pinned == 0
    assert index.lookup("a", _tokens(12)) == Hit(8, first.new_blocks)
    assert len(index.reserve("b", _tokens(16)).new_blocks) == 4, "a's blocks could be evicted"


def test_extension_copies_only_the_new_blocks() -> None:
    index = _index()
    first = _put(index, "a", _tokens(8))
    ext = _put(index, "a", _tokens(14))
    assert (ext.valid_tokens, ext.valid_blocks, len(ext.new_blocks)) == (8, first.new_blocks, 2)
    assert flatten(ext.new_extents) == list(ext.new_blocks)  # the copy plan's destination
    assert index.lookup("a", _tokens(14)) == Hit(14, first.new_blocks + ext.new_blocks)
    assert index.stats().used == 4


# --- prefix matching ------------------------------------------------------------------------


def test_divergent_history_reuses_the_common_full_blocks_and_commit_replaces_the_rest() -> None:
    index = _index()
    old_tokens = _tokens(12)
    old = _put(index, "a", old_tokens)
    edited = [*old_tokens[:5], 999, *old_tokens[6:], 12, 13]  # an edit inside block 1
    assert index.lookup("a", edited) == Hit(4, old.new_blocks[:1])
    new = index.reserve("a", edited)
    assert (new.valid_tokens, new.valid_blocks, len(new.new_blocks)) == (4, old.new_blocks[:1], 3)
    index.commit(new.reservation_id)
    assert index.lookup("a", edited) == Hit(14, old.new_blocks[:1] + new.new_blocks)
    assert index.lookup("a", old_tokens) == Hit(4, old.new_blocks[:1]), "old suffix is gone"
    assert index.stats().used == 4, "the old suffix's two blocks were freed"


def test_an_edit_in_the_first_block_reuses_nothing() -> None:
    index = _index()
    _put(index, "a", _tokens(12))
    assert index.lookup("a", [7, *_tokens(11, offset=1)]) == Hit(0, ())


def test_a_partial_last_block_is_reused_only_by_the_same_tokens() -> None:
    index = _index()
    tokens = _tokens(10)  # two full blocks and a partial one of 2 tokens
    blocks = _put(index, "a", tokens).new_blocks
    assert index.lookup("a", tokens) == Hit(10, blocks)
    assert index.lookup("a", _tokens(11)) == Hit(8, blocks[:2])
    assert index.lookup("a", _tokens(9)) == Hit(8, blocks[:2])
    assert index.lookup("a", [*tokens[:9], 55]) == Hit(8, blocks[:2])
    assert index.lookup("a", _tokens(7)) == Hit(4, blocks[:1])
    again = index.reserve("a", tokens)
    assert (again.valid_tokens, again.new_blocks) == (10, ())


def test_conversations_do_not_share_chains() -> None:
    index = _index()
    _put(index, "a", _tokens(8))
    assert index.lookup("b", _tokens(8)) == Hit(0, ())


# --- pins and eviction ----------------------------------------------------------------------


def test_eviction_skips_pinned_conversations() -> None:
    index = _index(8)
    a = _put(index, "a", _tokens(16))
    b = _put(index, "b", _tokens(16, offset=100))
    hit, handle = index.pin("a", _tokens(16))  # a is also the most recently used now
    assert hit == Hit(16, a.new_blocks)
    index.lookup("b", _tokens(16, offset=100))  # b is the most recently used
    c = index.reserve("c", _tokens(16, offset=200))
    assert set(c.new_blocks) == set(b.new_blocks), "pinned a survives although it is LRU"
    assert index.lookup("a", _tokens(16)) == Hit(16, a.new_blocks)
    assert index.lookup("b", _tokens(16, offset=100)) == Hit(0, ())
    assert index.stats().evicted_blocks == 4
    with pytest.raises(HostCapacityExhausted):
        index.reserve("d", _tokens(4, offset=300))
    index.unpin(handle.pin_id)
    assert index.reserve("d", _tokens(4, offset=300)).new_blocks == a.new_blocks[3:]


def test_eviction_trims_a_tail_up_to_the_pinned_prefix() -> None:
    index = _index(8)
    a = _put(index, "a", _tokens(16))
    _put(index, "b", _tokens(16, offset=100))
    index.pin("a", _tokens(8))  # a's first two blocks
    c = index.reserve("c", _tokens(24, offset=200))
    assert len(c.new_blocks) == 6
    assert index.lookup("a", _tokens(16)) == Hit(8, a.new_blocks[:2])
    assert index.lookup("b", _tokens(16, offset=100)) == Hit(0, ())
    assert dict(index.storage.items())["a"].num_tokens == 8


def test_blocks_dropped_while_pinned_are_freed_at_the_last_unpin() -> None:
    index = _index(4)
    a = _put(index, "a", _tokens(16))
    _, first = index.pin("a", _tokens(16))
    _, second = index.pin("a", _tokens(8))
    index.release("a")
    assert index.lookup("a", _tokens(16)) == Hit(0, ())
    assert index.stats().used == 4
    index.unpin(first.pin_id)
    assert _free_blocks(index) == set(a.new_blocks[2:])
    index.unpin(second.pin_id)
    assert _free_blocks(index) == set(a.new_blocks)
    with pytest.raises(KeyError):
        index.unpin(second.pin_id)


def test_a_commit_replacing_pinned_blocks_frees_them_at_unpin() -> None:
    index = _index(8)
    old = _put(index, "a", _tokens(12))
    _, handle = index.pin("a", _tokens(12))
    _put(index, "a", [*_tokens(4), 50, 51, 52, 53])
    assert index.stats().used == 3 + 1
    assert not _free_blocks(index) & set(old.new_blocks[1:]), "still being read"
    index.unpin(handle.pin_id)
    assert set(old.new_blocks[1:]) <= _free_blocks(index)
    assert index.stats().used == 2


def test_eviction_takes_least_recently_used_first() -> None:
    index = _index(12)
    for conv, offset in (("a", 0), ("b", 100), ("c", 200)):
        _put(index, conv, _tokens(16, offset=offset))
    index.lookup("a", _tokens(16))  # now b is the least recently used
    _put(index, "d", _tokens(16, offset=300))
    assert index.lookup("b", _tokens(16, offset=100)) == Hit(0, ())
    assert index.lookup("a", _tokens(16)).num_tokens == 16
    assert index.lookup("c", _tokens(16, offset=200)).num_tokens == 16


def test_a_partly_evicted_conversation_stays_least_recently_used() -> None:
    index = _index(8)
    _put(index, "a", _tokens(16))
    _put(index, "b", _tokens(16, offset=100))
    _put(index, "c", _tokens(8, offset=200))  # evicts a's last two blocks
    chain_lengths = {conv: len(record.blocks) for conv, record in index.storage.items()}
    assert chain_lengths == {"a": 2, "b": 4, "c": 2}
    _put(index, "d", _tokens(8, offset=300))  # a, untouched since, goes next
    chain_lengths = {conv: len(record.blocks) for conv, record in index.storage.items()}
    assert chain_lengths == {"b": 4, "c": 2, "d": 2}


def test_capacity_exhausted_changes_nothing() -> None:
    index = _index(6)
    _put(index, "a", _tokens(16))
    index.pin("a", _tokens(16))
    pending = index.reserve("b", _tokens(4, offset=100))
    before = _state(index)
    for conv, n in (("c", 8), ("a", 28), ("c", 100)):
        with pytest.raises(HostCapacityExhausted):
            index.reserve(conv, _tokens(n, offset=200))
        assert _state(index) == before
    index.commit(pending.reservation_id)
    assert index.lookup("b", _tokens(4, offset=100)).num_tokens == 4


# --- reservation errors ---------------------------------------------------------------------


def test_commit_after_the_conversation_was_released_is_stale() -> None:
    index = _index(8)
    _put(index, "a", _tokens(8))
    ext = index.reserve("a", _tokens(16))
    index.release("a")
    with pytest.raises(StaleReservation):
        index.commit(ext.reservation_id)
    assert index.stats().used == 0, "new blocks dropped, released prefix freed at unpin"
    assert index.lookup("a", _tokens(16)) == Hit(0, ())
    with pytest.raises(UnknownReservation):
        index.abort(ext.reservation_id)


def test_commit_after_a_diverging_commit_is_stale() -> None:
    index = _index(16)
    _put(index, "a", _tokens(8))
    longer = index.reserve("a", _tokens(16))
    edited = _put(index, "a", [*_tokens(4), 70, 71, 72, 73, 74])
    with pytest.raises(StaleReservation):
        index.commit(longer.reservation_id)
    assert index.lookup("a", [*_tokens(4), 70, 71, 72, 73, 74]).num_tokens == 9
    assert index.stats().used == 1 + len(edited.new_blocks)
    assert index.stats().pinned == 0


def test_concurrent_extensions_of_the_same_prefix_both_commit() -> None:
    index = _index(16)
    base = _put(index, "a", _tokens(8))
    first = index.reserve("a", _tokens(12))
    second = index.reserve("a", _tokens(16))
    index.commit(first.reservation_id)
    index.commit(second.reservation_id)
    assert index.lookup("a", _tokens(16)) == Hit(16, base.new_blocks + second.new_blocks)
    assert index.stats().used == 4, "the first extension's block was replaced and freed"


@pytest.mark.parametrize("finish", ["commit", "abort"])
def test_double_commit_or_abort_is_unknown(finish: str) -> None:
    index = _index()
    res = index.reserve("a", _tokens(8))
    getattr(index, finish)(res.reservation_id)
    with pytest.raises(UnknownReservation):
        index.commit(res.reservation_id)
    with pytest.raises(UnknownReservation):
        index.abort(res.reservation_id)
    with pytest.raises(UnknownReservation):
        index.commit(12345)


def test_reserving_nothing_is_refused() -> None:
    with pytest.raises(ValueError):
        _index().reserve("a", [])


# --- fingerprints and restarts --------------------------------------------------------------


def test_fingerprint_mismatch() -> None:
    index = _index()
    index.check_fingerprint(MODEL)
    with pytest.raises(FingerprintMismatch):
        index.check_fingerprint("tiny-llama@def456")


def test_two_fingerprints_never_share_a_chain() -> None:
    tokens = _tokens(40)
    ours = block_hashes(tokens, BS, MODEL)
    theirs = block_hashes(tokens, BS, "tiny-llama@def456")
    assert len(ours) == len(theirs) == 10
    assert not set(ours) & set(theirs)
    storage = MemoryIndexStorage()
    _put(_index(storage=storage), "a", tokens)
    other = ReuseIndex(
        fingerprint="tiny-llama@def456", block_size=BS, num_blocks=16, storage=storage
    )
    assert other.lookup("a", tokens) == Hit(0, ())


def test_block_hashes_chain_the_whole_prefix() -> None:
    a = block_hashes(_tokens(12), BS, MODEL)
    b = block_hashes([99, *_tokens(11, offset=1)], BS, MODEL)
    assert not set(a) & set(b), "a change in block 0 changes every later hash"
    assert block_hashes(_tokens(10), BS, MODEL)[:2] == a[:2]
    assert block_hashes(_tokens(10), BS, MODEL)[2] not in a
    assert block_hashes(_tokens(12), 6, MODEL) != block_hashes(_tokens(12), BS, MODEL)[:2]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 50_000), max_size=40),
    st.lists(st.integers(1, 9), min_size=1, max_size=12),
)
def test_token_chain_hashes_a_growing_list_like_block_hashes(
    tokens: list[int], steps: list[int]
) -> None:
    chain = TokenChain(BS, MODEL)
    end = 0
    for step in [*steps, len(tokens)]:
        end = min(end + step, len(tokens))
        assert chain.hashes(tokens[:end]) == block_hashes(tokens[:end], BS, MODEL)


def test_a_precomputed_chain_gives_the_same_answers() -> None:
    index = _index()
    tokens = _tokens(14)
    chain = TokenChain(BS, MODEL)
    res = index.reserve("a", tokens[:10], chain.hashes(tokens[:10]))
    index.commit(res.reservation_id)
    assert index.lookup("a", tokens[:10], chain.hashes(tokens[:10])) == Hit(10, res.new_blocks)
    hit, _ = index.pin("a", tokens, chain.hashes(tokens))
    assert hit == index.lookup("a", tokens) == Hit(8, res.new_blocks[:2])


def test_a_chain_of_the_wrong_length_is_refused() -> None:
    index = _index()
    _put(index, "a", _tokens(8))
    before = _state(index)
    short_chain = block_hashes(_tokens(8), BS, MODEL)
    for call in (index.lookup, index.reserve, index.pin):
        with pytest.raises(ValueError):
            call("a", _tokens(12), short_chain)
    assert _state(index) == before


def test_a_restarted_index_keeps_committed_chains_and_their_blocks() -> None:
    storage = MemoryIndexStorage()
    first = _index(8, storage)
    a = _put(first, "a", _tokens(12))
    b = _put(first, "b", _tokens(8, offset=100))
    first.reserve("c", _tokens(4, offset=200))  # pending: local, gone with the process
    restarted = _index(8, storage)
    assert restarted.lookup("a", _tokens(12)) == Hit(12, a.new_blocks)
    assert restarted.lookup("b", _tokens(8, offset=100)) == Hit(8, b.new_blocks)
    assert restarted.stats().used == 5
    fresh = restarted.reserve("c", _tokens(12, offset=200))
    assert not set(fresh.new_blocks) & set(a.new_blocks + b.new_blocks)
    assert len(fresh.new_blocks) == 3


# --- property test against a model ----------------------------------------------------------

CAPACITY = 24
CONVS = ("a", "b", "c")
TOKEN_LISTS = st.tuples(
    st.integers(1, 26), st.none() | st.tuples(st.integers(0, 25), st.integers(0, 2))
)


def _history(conv: str, spec: tuple[int, tuple[int, int] | None]) -> list[int]:
    """A conversation's history: a prefix of its base text, maybe with one edited token."""
    length, edit = spec
    tokens = _tokens(length, offset=1000 * CONVS.index(conv))
    if edit is not None and edit[0] < length:
        tokens[edit[0]] = -1 - edit[1]
    return tokens


def _blocks_of(tokens: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + BS]) for i in range(0, len(tokens), BS)]


class ReuseIndexMachine(RuleBasedStateMachine):
    """Random reserve / commit / abort / pin / unpin / release / lookup against a model.

    The model knows the tokens each conversation committed and what is pinned; it reads
    only chain lengths back from storage, since eviction may trim any unpinned tail.
    Rules pick reservations and pins in the order the model made them, never by their ids:
    the ids are random, and a run that depends on them cannot be replayed by hypothesis.
    """

    def __init__(self) -> None:
        super().__init__()
        self.index = _index(CAPACITY)
        self.committed: dict[str, tuple[list[int], tuple[int, ...]]] = {}
        self.pending: dict[int, tuple[Reservation, list[int]]] = {}
        self.pins: dict[int, tuple[int, ...]] = {}

    def _check_hit(self, conv: str, tokens: list[int], hit: Hit) -> None:
        """The longest prefix of whole (or the exact partial) blocks matching what was committed."""
        record = self.index.storage.get(conv)
        held = len(record.blocks) if record else 0
        if conv not in self.committed:
            assert hit == Hit(0, ())
            return
        old_tokens, old_blocks = self.committed[conv]
        n = 0
        for want, have in zip(_blocks_of(tokens), _blocks_of(old_tokens)[:held], strict=False):
            if want != have:
                break
            n += 1
        assert hit == Hit(min(n * BS, len(tokens)), old_blocks[:n])

    def _pinned(self) -> list[int]:
        handles = [*self.pins.values(), *(res.valid_blocks for res, _ in self.pending.values())]
        return [b for blocks in handles for b in blocks]

    def _reserve(self, conv: str, tokens: list[int]) -> int | None:
        before = _state(self.index)
        pinned = set(self._pinned())
        pinned_positions = {
            (c, i, b)
            for c, record in self.index.storage.items()
            for i, b in enumerate(record.blocks)
            if b in pinned
        }
        try:
            res = self.index.reserve(conv, tokens)
        except HostCapacityExhausted:
            assert _state(self.index) == before
            return None
        self._check_hit(conv, tokens, Hit(res.valid_tokens, res.valid_blocks))
        assert len(res.valid_blocks) + len(res.new_blocks) == len(_blocks_of(tokens))
        for c, i, b in pinned_positions:
            record = self.index.storage.get(c)
            assert record is not None and record.blocks[i] == b, "a pinned block was evicted"
        for evicted in [c for c in self.committed if self.index.storage.get(c) is None]:
            del self.committed[evicted]
        self.pending[res.reservation_id] = (res, tokens)
        return res.reservation_id

    def _finish(self, rid: int, *, commit: bool) -> None:
        res, tokens = self.pending.pop(rid)
        if not commit:
            self.index.abort(rid)
            return
        base = len(res.valid_blocks)
        record = self.index.storage.get(res.conversation)
        old = self.committed.get(res.conversation)
        same_prefix = (
            record is not None
            and old is not None
            and record.blocks[:base] == res.valid_blocks
            and _blocks_of(old[0])[:base] == _blocks_of(tokens)[:base]
        )
        if base and not same_prefix:
            with pytest.raises(StaleReservation):
                self.index.commit(rid)
            return
        self.index.commit(rid)
        self.committed[res.conversation] = (tokens, res.valid_blocks + res.new_blocks)

    @precondition(lambda self: len(self.pending) < 4)  # else capacity is mostly in flight
    @rule(conv=st.sampled_from(CONVS), spec=TOKEN_LISTS)
    def reserve(self, conv: str, spec: tuple[int, tuple[int, int] | None]) -> None:
        self._reserve(conv, _history(conv, spec))

    @rule(conv=st.sampled_from(CONVS), spec=TOKEN_LISTS)
    def put(self, conv: str, spec: tuple[int, tuple[int, int] | None]) -> None:
        """Reserve and commit at once: a swap-out whose copy completed."""
        rid = self._reserve(conv, _history(conv, spec))
        if rid is not None:
            self._finish(rid, commit=True)

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 100), commit=st.booleans())
    def finish(self, pick: int, commit: bool) -> None:
        self._finish(list(self.pending)[pick % len(self.pending)], commit=commit)

    @rule(conv=st.sampled_from(CONVS), spec=TOKEN_LISTS)
    def lookup(self, conv: str, spec: tuple[int, tuple[int, int] | None]) -> None:
        tokens = _history(conv, spec)
        self._check_hit(conv, tokens, self.index.lookup(conv, tokens))

    @rule(conv=st.sampled_from(CONVS), spec=TOKEN_LISTS)
    def pin(self, conv: str, spec: tuple[int, tuple[int, int] | None]) -> None:
        tokens = _history(conv, spec)
        hit, handle = self.index.pin(conv, tokens)
        self._check_hit(conv, tokens, hit)
        assert handle.blocks == hit.blocks
        self.pins[handle.pin_id] = handle.blocks

    @precondition(lambda self: self.pins)
    @rule(pick=st.integers(0, 100))
    def unpin(self, pick: int) -> None:
        pin_id = list(self.pins)[pick % len(self.pins)]
        del self.pins[pin_id]
        self.index.unpin(pin_id)

    @rule(conv=st.sampled_from(CONVS))
    def release(self, conv: str) -> None:
        self.index.release(conv)
        self.committed.pop(conv, None)

    @invariant()
    def host_blocks_are_never_double_used(self) -> None:
        committed = [b for _, r in self.index.storage.items() for b in r.blocks]
        reserved = [b for res, _ in self.pending.values() for b in res.new_blocks]
        free = flatten(self.index._free)
        dead = set(self._pinned()) - set(committed)  # dropped while pinned
        everything = committed + reserved + free
        assert len(everything) == len(set(everything)), "a host block is used twice"
        assert not dead & set(everything)
        assert len(everything) == CAPACITY - len(dead)
        assert self.index.stats().used == CAPACITY - len(free)

    @invariant()
    def pins_match_the_model(self) -> None:
        pinned = self._pinned()
        assert self.index._pins == {b: pinned.count(b) for b in set(pinned)}
        assert self.index.stats().pinned == len(set(pinned))

    @invariant()
    def stored_chains_are_prefixes_of_commits(self) -> None:
        for conv, record in self.index.storage.items():
            tokens, blocks = self.committed[conv]
            n = len(record.blocks)
            assert record.blocks == blocks[:n]
            assert record.hashes == tuple(block_hashes(tokens, BS, MODEL)[:n])
            assert record.num_tokens == min(len(tokens), n * BS)


def test_reuse_index_matches_model() -> None:
    run_state_machine_as_test(
        ReuseIndexMachine,
        settings=settings(max_examples=120, stateful_step_count=50, deadline=None),
    )


@pytest.mark.parametrize("ids", ["ascending", "descending"])
def test_the_model_does_not_depend_on_the_order_of_random_ids(
    ids: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The falsifying example of the former flake, as a plain sequence.

    `finish` and `unpin` once picked by sorted id, so which reservation committed and which
    pin stayed depended on the random ids. Hypothesis then saw a replayed run reach a
    different state (a reserve refused for capacity or not, so other rules enabled) and
    failed with FlakyStrategyDefinition in about one run in ten. Whatever the ids' order,
    this sequence must end in the one state picking by creation order gives.
    """
    counter: Iterator[int] = (
        itertools.count(1) if ids == "ascending" else itertools.count(2**40, -1)
    )
    monkeypatch.setattr(reuse_index, "secrets", SimpleNamespace(randbits=lambda _: next(counter)))
    machine = ReuseIndexMachine()
    machine.reserve("a", (8, None))
    machine.reserve("b", (4, None))
    machine.finish(pick=0, commit=True)
    machine.pin("b", (4, None))
    machine.put("b", (4, None))
    machine.pin("b", (4, None))
    machine.unpin(pick=0)
    machine.host_blocks_are_never_double_used()
    machine.pins_match_the_model()
    machine.stored_chains_are_prefixes_of_commits()
    assert set(machine.committed) == {"a", "b"}
    assert [res.conversation for res, _ in machine.pending.values()] == ["b"]
    assert list(machine.pins.values()) == [machine.committed["b"][1]]
