"""The CuPy engine on a real GPU; skipped (never faked) where there is none."""

from __future__ import annotations

import asyncio

import pytest
import torch

from common.kv.swap_plan import plan_copies
from common.shm.arena import HostArena
from services.executor.arena_view import arena_tensor

cupy = pytest.importorskip("cupy", reason="cupy is not installed (the [gpu] extra)")


def _cuda_device_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


if _cuda_device_count() == 0 or not torch.cuda.is_available():
    pytest.skip("no CUDA device visible to both cupy and torch", allow_module_level=True)

from services.executor.copy.cupy_backend import CupyCopyEngine  # noqa: E402

BLOCK_SHAPE = (4, 2, 16, 2, 64)  # layers, K/V, block_size, kv_heads, head_dim
BLOCK_BYTES = 4 * 2 * 16 * 2 * 64 * 2


def _bytes(cache: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    return cache.view(torch.uint8).reshape(cache.shape[0], -1)[blocks].cpu()


async def test_round_trip_through_pinned_arena_is_bit_identical() -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    device = torch.randint(-(2**15), 2**15, (16, *BLOCK_SHAPE), dtype=torch.int16,
                           device="cuda", generator=generator).view(torch.float16)
    original = device.clone()
    with HostArena.local(8, BLOCK_BYTES) as arena:
        host = arena_tensor(arena, torch.float16, BLOCK_SHAPE)
        with CupyCopyEngine(device, host) as engine:
            device.add_(0)  # a "step" on torch's stream that the swap-out must follow
            out = engine.submit("out", "r1", plan_copies([1, 2, 3, 7], [0, 1, 2, 3]),
                                after=engine.step_fence())
            back_in = engine.submit("in", "r1", plan_copies([0, 1, 2, 3], [12, 13, 14, 15]))
            async with asyncio.timeout(30):
                done_out = await asyncio.wrap_future(out.future)
                done_in = await asyncio.wrap_future(back_in.future)
        assert done_out.error is None and done_in.error is None
        assert done_out.bytes == 4 * BLOCK_BYTES and done_out.duration_s > 0
        assert torch.equal(_bytes(host, [0, 1, 2, 3]), _bytes(original, [1, 2, 3, 7]))
        assert torch.equal(_bytes(device, [12, 13, 14, 15]), _bytes(original, [1, 2, 3, 7]))
        assert torch.equal(_bytes(device, list(range(12))), _bytes(original, list(range(12))))
        del host


def test_invalid_swap_is_rejected_before_any_copy() -> None:
    device = torch.ones(4, *BLOCK_SHAPE, dtype=torch.float16, device="cuda")
    with HostArena.local(4, BLOCK_BYTES) as arena:
        host = arena_tensor(arena, torch.float16, BLOCK_SHAPE)
        with CupyCopyEngine(device, host) as engine:
            with pytest.raises(ValueError, match="outside the 4 host blocks"):
                engine.submit("out", "r1", plan_copies([0, 1], [2, 4]))
            assert engine.wait_all(timeout=30) == []
        assert not host.view(torch.int16).any()
        del host
