"""`host_ops.apply` as a property: no sequence of batches leaks a pin or a reservation.

Batches of random intents, whose commits, aborts and unpins name earlier replies' ids,
finished ones (a double commit) or ids never handed out, run on a small index that fills
up. Once every reservation is committed or aborted and every pin unpinned, the index holds
exactly the blocks of its committed chains, and nothing is pinned.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from common.kv import host_ops
from common.kv.block_hash import block_hashes
from common.kv.host_ops import Abort, Commit, HostOp, Pin, Pinned, Release, Reserve, Unpin
from common.kv.reuse_index import ReuseIndex

FINGERPRINT = "fp"
BLOCK_SIZE = 4
NUM_BLOCKS = 12
CONVS = ("a", "b", "c")

chain_step = st.tuples(
    st.sampled_from(["reserve", "pin"]),
    st.sampled_from(CONVS),
    st.integers(1, 20),  # tokens
    st.integers(0, 1),  # which history: two differ from the second block on
)
ref_step = st.tuples(st.sampled_from(["commit", "abort", "unpin"]), st.integers(0, 30))
release_step = st.tuples(st.just("release"), st.sampled_from(CONVS))
batches = st.lists(st.lists(st.one_of(chain_step, ref_step, release_step), max_size=6),
                   max_size=12)


def history(conv: str, variant: int, num_tokens: int) -> list[int]:
    base = [ord(conv) * 100 + i for i in range(20)]
    return base[:BLOCK_SIZE] + [t + 5000 * variant for t in base[BLOCK_SIZE:num_tokens]]


class Client:
    """Turns steps into ops and keeps the ids that the replies hand out."""

    def __init__(self) -> None:
        self.reservations: list[int] = []
        self.pins: list[int] = []
        self.finished: list[int] = []
        self.op_ids = 0

    def op(self, step: tuple) -> HostOp:
        match step:
            case ("reserve" | "pin") as kind, conv, n, variant:
                self.op_ids += 1
                tokens = history(conv, variant, n)
                chain = tuple(block_hashes(tokens, BLOCK_SIZE, FINGERPRINT))
                cls = Reserve if kind == "reserve" else Pin
                return cls(self.op_ids, conv, chain, n)
            case ("commit" | "abort") as kind, k:
                cls = Commit if kind == "commit" else Abort
                return cls(self._take(self.reservations, k))
            case "unpin", k:
                return Unpin(self._take(self.pins, k))
            case "release", conv:
                return Release(conv)
        raise AssertionError(step)

    def _take(self, held: list[int], k: int) -> int:
        """An outstanding id, else a finished one, else one never handed out."""
        if k < len(held):
            chosen = held.pop(k)
            self.finished.append(chosen)
            return chosen
        return self.finished[k % len(self.finished)] if self.finished else 1000 + k

    def take_replies(self, ops: list[HostOp], replies: list[host_ops.HostReply]) -> None:
        assert [r.op_id for r in replies] == [o.op_id for o in ops if isinstance(o, Reserve | Pin)]
        for reply in replies:
            if isinstance(reply, Pinned):
                assert reply.pin.blocks == reply.hit.blocks
                self.pins.append(reply.pin.pin_id)
            elif reply.reservation is not None:
                self.reservations.append(reply.reservation.reservation_id)


@settings(max_examples=300, deadline=None)
@given(batches)
def test_no_sequence_of_ops_leaks_a_pin_or_a_reservation(steps: list[list[tuple]]) -> None:
    index = ReuseIndex(fingerprint=FINGERPRINT, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
    client = Client()
    for batch in steps:
        ops = [client.op(step) for step in batch]
        client.take_replies(ops, host_ops.apply(index, ops))
    cleanup: list[HostOp] = [
        (Commit if i % 2 else Abort)(r) for i, r in enumerate(client.reservations)]
    cleanup += [Unpin(p) for p in client.pins]
    assert host_ops.apply(index, cleanup) == []
    stats = index.stats()
    held = [b for _, record in index.storage.items() for b in record.blocks]
    assert stats.pinned == 0
    assert len(set(held)) == len(held) and all(0 <= b < NUM_BLOCKS for b in held)
    assert stats.used == len(held)  # no block of a reservation or a dropped pin is left over
