"""CPU copy engine: the "device" cache is a CPU tensor and the workers stand in for streams.

Each byte range is one `copy_` between flat byte views; torch releases the GIL while it
copies, so swaps overlap the step running on the executor's thread.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import torch

from services.executor.copy.engine import CopyEngine, Swap, SwapError

StepFuture = Future[object]


class CpuCopyEngine(CopyEngine[StepFuture]):
    """Fences are futures of steps: a swap-out waits for the step that last wrote it."""

    def __init__(self, device: torch.Tensor, host: torch.Tensor) -> None:
        super().__init__(device, host)
        device_bytes, host_bytes = _flat_bytes(device), _flat_bytes(host)
        self._src_dst = {"out": (device_bytes, host_bytes), "in": (host_bytes, device_bytes)}

    def step_fence(self) -> StepFuture:
        """Already passed: a CPU step has finished writing when it returns."""
        fence: StepFuture = Future()
        fence.set_result(None)
        return fence

    def _host_dependencies(self, swap: Swap[StepFuture]) -> list[Future[Any]]:
        after = [swap.after] if swap.after is not None else []
        return [*super()._host_dependencies(swap), *after]

    def close(self) -> None:
        """Also drops the cache views, so that the host arena can be unmapped."""
        super().close()
        self._src_dst.clear()

    def _run(self, swap: Swap[StepFuture]) -> float:
        if swap.after is not None:
            try:
                swap.after.result()
            except Exception as exc:
                raise SwapError(f"the step that last wrote the blocks failed: {exc}") from exc
        src, dst = self._src_dst[swap.ticket.direction]
        start = time.perf_counter()
        for r in swap.ranges:
            dst[r.dst : r.dst + r.nbytes].copy_(src[r.src : r.src + r.nbytes])
        return time.perf_counter() - start


def _flat_bytes(cache: torch.Tensor) -> torch.Tensor:
    if cache.device.type != "cpu":
        raise ValueError(f"CPU copy engine needs CPU tensors, got one on {cache.device}")
    return cache.view(-1).view(torch.uint8)
