from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future, wait

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.kv.extent import Extent
from common.kv.swap_plan import Copy, plan_copies
from common.shm.arena import HostArena
from services.executor.arena_view import arena_tensor
from services.executor.copy import CpuCopyEngine, SwapCompletion
from services.executor.copy.completions import CompletionHub

BLOCK_SHAPE = (2, 2, 4, 2, 8)  # layers, K/V, block_size, kv_heads, head_dim
BLOCK_BYTES = 2 * 2 * 4 * 2 * 8 * 2  # float16
DEVICE_BLOCKS, HOST_BLOCKS = 16, 12


def _random_cache(num_blocks: int, seed: int) -> torch.Tensor:
    """Random bit patterns, NaNs included: equality below is on bytes, not on values."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, (num_blocks, *BLOCK_SHAPE), generator=generator,
                         dtype=torch.int16)
    return bits.view(torch.float16)


def _bytes(cache: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    return cache.view(torch.uint8).reshape(cache.shape[0], -1)[blocks]


@pytest.fixture
def caches() -> tuple[torch.Tensor, torch.Tensor]:
    return _random_cache(DEVICE_BLOCKS, seed=1), torch.zeros(HOST_BLOCKS, *BLOCK_SHAPE,
                                                              dtype=torch.float16)


@pytest.fixture
def step() -> Iterator[Future[object]]:
    """A step still running; released at teardown so a failed test cannot hang in close()."""
    step: Future[object] = Future()
    yield step
    if not step.done():
        step.set_result(None)


@pytest.fixture
def engine(caches: tuple[torch.Tensor, torch.Tensor]) -> Iterator[CpuCopyEngine]:
    with CpuCopyEngine(*caches) as engine:
        yield engine


def test_round_trip_through_the_arena_is_bit_identical() -> None:
    device = _random_cache(DEVICE_BLOCKS, seed=7)
    original = device.clone()
    with HostArena.local(HOST_BLOCKS, BLOCK_BYTES) as arena:
        host = arena_tensor(arena, torch.float16, BLOCK_SHAPE)
        with CpuCopyEngine(device, host) as engine:
            out_plan = plan_copies([2, 3, 4, 9, 10], [0, 1, 2, 5, 6])
            assert len(out_plan) == 2  # one copy per block group
            swap_out = engine.submit("out", "r1", out_plan).future.result()
            swap_in = engine.submit("in", "r1", plan_copies([0, 1, 2, 5, 6],
                                                            [11, 12, 13, 14, 15])).future.result()
        for completion in (swap_out, swap_in):
            assert completion.error is None
            assert completion.bytes == 5 * BLOCK_BYTES
        assert torch.equal(_bytes(device, [11, 12, 13, 14, 15]),
                           _bytes(original, [2, 3, 4, 9, 10]))
        assert torch.equal(_bytes(device, list(range(11))), _bytes(original, list(range(11))))
        del host


def _bad_length() -> Copy:
    copy = Copy(Extent(0, 2), Extent(4, 2))
    object.__setattr__(copy, "dst", Extent(4, 3))  # as if built without the dataclass check
    return copy


@pytest.mark.parametrize(
    ("direction", "copies", "message"),
    [
        ("out", [Copy(Extent(15, 2), Extent(0, 2))], r"copy 0: src blocks 15..16 .* 16 device"),
        ("out", [Copy(Extent(0, 2), Extent(11, 2))], r"copy 0: dst blocks 11..12 .* 12 host"),
        ("in", [Copy(Extent(0, 1), Extent(3, 1)), Copy(Extent(11, 2), Extent(5, 2))],
         r"copy 1: src blocks 11..12 .* 12 host"),
        ("out", [Copy(Extent(0, 3), Extent(2, 3)), Copy(Extent(8, 2), Extent(4, 2))],
         r"copies 0 and 1 both write host block 4"),
        ("in", [Copy(Extent(0, 1), Extent(7, 1)), Copy(Extent(1, 1), Extent(7, 1))],
         r"copies 0 and 1 both write device block 7"),
        ("out", [_bad_length()], r"copy 0: .* differ in length"),
        ("sideways", [Copy(Extent(0, 1), Extent(0, 1))], r"direction must be"),
    ],
)
def test_invalid_submissions_raise_and_copy_nothing(
    engine: CpuCopyEngine,
    caches: tuple[torch.Tensor, torch.Tensor],
    direction: str,
    copies: list[Copy],
    message: str,
) -> None:
    device, host = caches
    host.copy_(_random_cache(HOST_BLOCKS, seed=2))
    before = device.clone(), host.clone()
    # A valid first copy in the same submission must not be copied either.
    with pytest.raises(ValueError, match=message):
        engine.submit(direction, "r1", copies)  # type: ignore[arg-type]
    assert engine.wait_all(timeout=10) == []
    assert torch.equal(device.view(torch.int16), before[0].view(torch.int16))
    assert torch.equal(host.view(torch.int16), before[1].view(torch.int16))


async def test_tickets_resolve_to_their_completions_in_the_asyncio_loop(
    engine: CpuCopyEngine,
) -> None:
    out = engine.submit("out", "r1", plan_copies([0, 1, 2], [3, 4, 5]))
    swap_in = engine.submit("in", "r2", plan_copies([9], [15]))
    async with asyncio.timeout(10):
        done_out = await asyncio.wrap_future(out.future)
        done_in = await asyncio.wrap_future(swap_in.future)
    assert (done_out.ticket, done_in.ticket) == (out, swap_in)
    assert (done_out.request_id, done_out.direction, done_out.bytes, done_out.error) == (
        "r1", "out", 3 * BLOCK_BYTES, None)
    assert done_in.direction == "in" and done_in.bytes == BLOCK_BYTES


async def test_a_hub_delivers_from_other_threads_and_closing_ends_the_iteration() -> None:
    hub: CompletionHub[str] = CompletionHub()
    stream = hub.subscribe()
    publisher = threading.Thread(target=lambda: [hub.publish(x) for x in ("a", "b")])
    publisher.start()
    publisher.join()
    stream.close()
    hub.publish("after close")
    async with asyncio.timeout(10):
        seen = [item async for item in stream]
    assert seen == ["a", "b"]


def test_wait_all_is_a_barrier_over_every_outstanding_swap(
    engine: CpuCopyEngine, caches: tuple[torch.Tensor, torch.Tensor], step: Future[object]
) -> None:
    device, host = caches
    held = engine.submit("out", "r1", plan_copies([0, 1], [0, 1]), after=step)
    free = engine.submit("out", "r2", plan_copies([5], [5]))
    assert not held.done() and not host[:2].any()
    threading.Timer(0.05, step.set_result, args=(None,)).start()

    completions = engine.wait_all(timeout=10)

    # `free` may have finished before the barrier; `held` cannot have.
    assert held in [c.ticket for c in completions]
    assert all(isinstance(c, SwapCompletion) and c.error is None for c in completions)
    assert held.done() and free.done() and engine.wait_all(timeout=0) == []
    assert torch.equal(_bytes(host, [0, 1, 5]), _bytes(device, [0, 1, 5]))


def test_swap_in_of_a_request_waits_for_its_swap_out(
    engine: CpuCopyEngine, caches: tuple[torch.Tensor, torch.Tensor], step: Future[object]
) -> None:
    device, _ = caches
    original = device.clone()
    out = engine.submit("out", "r1", plan_copies([0, 1, 2, 3], [0, 1, 2, 3]), after=step)
    back_in = engine.submit("in", "r1", plan_copies([0, 1, 2, 3], [8, 9, 10, 11]))
    other_in = engine.submit("in", "r2", plan_copies([6], [13]))

    # The held swap-out stalls its own request only: the in-worker is free for other work.
    assert other_in.future.result(10).error is None
    done, _ = wait([back_in.future], timeout=0.2)
    assert not done and not out.done()
    assert torch.equal(_bytes(device, [8, 9, 10, 11]), _bytes(original, [8, 9, 10, 11]))

    step.set_result(None)
    assert back_in.future.result(10).error is None
    assert out.done()
    assert torch.equal(_bytes(device, [8, 9, 10, 11]), _bytes(original, [0, 1, 2, 3]))


def test_a_failed_step_fails_its_swap_out_and_the_swap_in_behind_it(
    engine: CpuCopyEngine, caches: tuple[torch.Tensor, torch.Tensor], step: Future[object]
) -> None:
    device, host = caches
    original = device.clone()
    out = engine.submit("out", "r1", plan_copies([0, 1], [0, 1]), after=step)
    back_in = engine.submit("in", "r1", plan_copies([0, 1], [8, 9]))
    step.set_exception(RuntimeError("forward pass blew up"))

    out_done, in_done = out.future.result(10), back_in.future.result(10)

    assert out_done.error is not None and "forward pass blew up" in out_done.error
    assert in_done.error is not None and f"failed ticket {out.id}" in in_done.error
    assert not host.any()
    assert torch.equal(device.view(torch.int16), original.view(torch.int16))


def test_closed_engine_refuses_new_swaps(caches: tuple[torch.Tensor, torch.Tensor]) -> None:
    engine = CpuCopyEngine(*caches)
    ticket = engine.submit("out", "r1", plan_copies([0], [0]))
    engine.close()
    assert ticket.done()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit("out", "r1", plan_copies([1], [1]))


def test_caches_of_different_block_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="device blocks are 512 bytes, host blocks 256"):
        CpuCopyEngine(_random_cache(2, seed=0), torch.zeros(2, 128, dtype=torch.float16))


@st.composite
def _swaps(draw: st.DrawFn) -> tuple[str, list[Copy]]:
    """A direction and copies whose dst extents are disjoint, in random order."""
    direction = draw(st.sampled_from(["out", "in"]))
    src_blocks, dst_blocks = ((DEVICE_BLOCKS, HOST_BLOCKS) if direction == "out"
                              else (HOST_BLOCKS, DEVICE_BLOCKS))
    used = draw(st.lists(st.booleans(), min_size=dst_blocks, max_size=dst_blocks))
    cut = draw(st.lists(st.booleans(), min_size=dst_blocks, max_size=dst_blocks))
    dst_extents: list[Extent] = []
    for block in range(dst_blocks):
        if not used[block]:
            continue
        last = dst_extents[-1] if dst_extents else None
        if last is not None and last.end == block and not cut[block]:
            dst_extents[-1] = Extent(last.start, last.length + 1)
        else:
            dst_extents.append(Extent(block, 1))
    copies = [
        Copy(Extent(draw(st.integers(0, src_blocks - dst.length)), dst.length), dst)
        for dst in dst_extents
    ]
    return direction, draw(st.permutations(copies))


@settings(max_examples=60, deadline=None)
@given(swap=_swaps())
def test_random_swaps_copy_exactly_the_planned_blocks(swap: tuple[str, list[Copy]]) -> None:
    direction, copies = swap
    device = _random_cache(DEVICE_BLOCKS, seed=3)
    host = _random_cache(HOST_BLOCKS, seed=4)
    src, dst = (device, host) if direction == "out" else (host, device)
    expected_src, expected_dst = src.clone(), dst.clone()
    for copy in copies:
        for s, d in zip(copy.src.blocks(), copy.dst.blocks(), strict=True):
            expected_dst[d] = src[s]

    with CpuCopyEngine(device, host) as engine:
        completion = engine.submit(direction, "r", copies).future.result(10)  # type: ignore[arg-type]

    assert completion.error is None
    assert completion.bytes == sum(copy.num_blocks for copy in copies) * BLOCK_BYTES
    assert torch.equal(dst.view(torch.int16), expected_dst.view(torch.int16))
    assert torch.equal(src.view(torch.int16), expected_src.view(torch.int16))
