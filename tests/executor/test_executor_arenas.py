"""The executor with several host arenas (one per KV store): one global host id space,
each swap confined to one arena and copied there at the arena's own block ids."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from common.kv.swap_plan import plan_copies
from common.shm.arena import HostArena
from services.executor.arena_view import arena_tensor
from services.executor.copy import CpuCopyEngine
from services.executor.engine import (
    AttachedArena,
    ExecutorEngine,
    InvalidInput,
    PreconditionFailed,
    SwapDone,
    SwapOrder,
)
from services.executor.model import KVCacheGeometry, load_checkpoint

DEVICE_BLOCKS = 16
ARENA_BLOCKS = (6, 4)  # global host ids: [0, 6) in the first arena, [6, 10) in the second


@pytest.fixture
def setup(checkpoint: Path) -> Iterator[tuple[ExecutorEngine, list[HostArena]]]:
    config, model = load_checkpoint(checkpoint)
    cache = KVCacheGeometry.for_model(config, num_blocks=DEVICE_BLOCKS, block_size=4).allocate()
    cache.copy_(torch.randn_like(cache))
    engine = ExecutorEngine(config, model, cache, backend="cpu", copy_engine=CpuCopyEngine)
    with ExitStack() as stack:
        arenas = [stack.enter_context(HostArena.local(n, engine.geometry.block_bytes))
                  for n in ARENA_BLOCKS]
        yield engine, arenas
        engine.close()


def order(swap_id: int, request_id: str, direction: str, src: list[int],
          dst: list[int]) -> SwapOrder:
    return SwapOrder(swap_id, request_id, direction, plan_copies(src, dst))  # type: ignore[arg-type]


def attach_all(engine: ExecutorEngine, arenas: list[HostArena]) -> list[AttachedArena]:
    return [engine.attach_host_arena(a.name) for a in arenas]


def test_arenas_take_consecutive_global_ids_in_attach_order(
    setup: tuple[ExecutorEngine, list[HostArena]],
) -> None:
    engine, arenas = setup
    first, second = attach_all(engine, arenas)
    assert (first.first_block, first.num_blocks) == (0, 6)
    assert (second.first_block, second.num_blocks) == (6, 4)
    assert engine.attach_host_arena(arenas[0].name) == first  # idempotent, nothing appended
    described = engine.describe()
    assert described.host_arenas == (arenas[0].name, arenas[1].name)
    assert described.num_host_blocks == 10


async def test_a_swap_lands_in_its_arena_at_the_local_block(
    setup: tuple[ExecutorEngine, list[HostArena]],
) -> None:
    engine, arenas = setup
    attach_all(engine, arenas)
    original = engine.cache.clone()
    shape = engine.geometry.block_shape
    with engine.subscribe() as completions:
        # Global host blocks 7, 8 are blocks 1, 2 of the second arena; 0 is the first's 0.
        engine.submit_swaps([order(1, "a", "out", [3, 4], [7, 8]),
                             order(2, "b", "out", [5], [0])])
        done: list[SwapDone] = [await anext(completions), await anext(completions)]  # type: ignore[list-item]
        assert all(d.error is None for d in done)
        second = arena_tensor(arenas[1], engine.cache.dtype, shape)
        first = arena_tensor(arenas[0], engine.cache.dtype, shape)
        assert torch.equal(second[1:3], original[3:5])
        assert torch.equal(first[0], original[5])
        assert not torch.equal(second[0], original[3])  # nothing at the global id as a local one
        del first, second
        engine.submit_swaps([order(3, "a", "in", [7, 8], [10, 11])])
        back: SwapDone = await anext(completions)  # type: ignore[assignment]
    assert back.error is None
    assert torch.equal(engine.cache[10:12], original[3:5])


@pytest.mark.parametrize(("src", "dst", "message"), [
    ([0, 1], [5, 6], r"swaps\[0\]\.copies\[0\]\.dst=\[5, 7\) crosses the end of host arena"),
    ([0, 1], [2, 7], r"swaps\[0\]\.copies\[1\]\.dst=\[7, 8\) is in host arena .* but earlier "
                     r"copies are in"),
    ([0], [10], r"swaps\[0\]\.copies\[0\]\.dst=\[10, 11\) out of range \[0, 10\) host blocks"),
])
def test_an_order_must_stay_in_one_arena(
    setup: tuple[ExecutorEngine, list[HostArena]], src: list[int], dst: list[int], message: str,
) -> None:
    engine, arenas = setup
    attach_all(engine, arenas)
    with pytest.raises(InvalidInput, match=message):
        engine.submit_swaps([order(1, "a", "out", src, dst)])


def test_one_requests_swaps_in_flight_share_an_arena(
    setup: tuple[ExecutorEngine, list[HostArena]],
) -> None:
    engine, arenas = setup
    attach_all(engine, arenas)
    with pytest.raises(PreconditionFailed, match=r"swaps\[1\]: swap 1 of 'a' is in flight"):
        engine.submit_swaps([order(1, "a", "out", [0], [0]), order(2, "a", "out", [1], [6])])


def test_a_detached_arena_refuses_swaps_and_its_ids_are_never_reused(
    setup: tuple[ExecutorEngine, list[HostArena]],
) -> None:
    engine, arenas = setup
    attach_all(engine, arenas)
    assert engine.detach_host_arena(arenas[0].name) == AttachedArena(arenas[0].name, 0, 6)
    assert engine.describe().host_arenas == (arenas[1].name,)
    assert engine.describe().num_host_blocks == 4
    with pytest.raises(PreconditionFailed, match=r"swaps\[0\]\.copies\[0\]\.dst=\[0, 1\) is "
                                                 r"in host arena .* which is detached") as refused:
        engine.submit_swaps([order(1, "a", "out", [0], [0])])
    assert refused.value.request_id == "a"
    engine.submit_swaps([order(2, "b", "out", [1], [7])])  # the other arena still serves
    with HostArena.local(3, engine.geometry.block_bytes) as third:
        assert engine.attach_host_arena(third.name).first_block == 10  # after the detached
        again = engine.attach_host_arena(arenas[0].name)  # attached anew, after the others
        assert (again.first_block, again.num_blocks) == (13, 6)
        assert engine.describe().host_arenas == (arenas[1].name, third.name, arenas[0].name)
        with pytest.raises(FileNotFoundError):
            engine.detach_host_arena("no-such-arena")
        engine.detach_host_arena(third.name)  # unmapped now, so the segment can go


def test_a_refusal_names_the_request_of_the_offending_entry(
    setup: tuple[ExecutorEngine, list[HostArena]],
) -> None:
    engine, arenas = setup
    attach_all(engine, arenas)
    with pytest.raises(InvalidInput, match=r"swaps\[1\]\.copies\[0\]\.src") as swap:
        engine.submit_swaps([order(1, "good", "out", [0], [0]),
                             order(2, "bad", "out", [DEVICE_BLOCKS], [1])])
    assert swap.value.request_id == "bad"
    with pytest.raises(PreconditionFailed, match="no host arena attached") as whole:
        for arena in arenas:
            engine.detach_host_arena(arena.name)
        engine.submit_swaps([order(3, "good", "out", [0], [0])])
    assert whole.value.request_id == ""  # about the call, not about one request
