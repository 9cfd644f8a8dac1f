"""CuPy copy engine: one `cudaMemcpyAsync` per block group on a dedicated copy stream.

The device cache stays torch's CUDA tensor, shared with CuPy through DLPack; the host
cache (the kvstore's arena) is pinned in place with `cudaHostRegister` so copies are DMA
straight into the store's memory. Swaps overlap compute because the copy streams are
non-blocking and wait only on the events they are given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from services.executor.copy.engine import CopyEngine, Swap
from services.executor.copy.layout import DIRECTIONS

if TYPE_CHECKING:
    from cupy.cuda import Event

# cudaHostRegisterPortable: pinned for every CUDA context, not just the current one.
_HOST_REGISTER_PORTABLE = 1


class CupyCopyEngine(CopyEngine["Event"]):
    """Fences are CUDA events; `step_fence()` records one on torch's current stream."""

    def __init__(self, device: torch.Tensor, host: torch.Tensor) -> None:
        import cupy  # lazily: the CPU-only install has no CuPy

        if device.device.type != "cuda" or host.device.type != "cpu":
            raise ValueError(f"need a CUDA device cache and a CPU host cache, got "
                             f"{device.device} and {host.device}")
        super().__init__(device, host)
        self._cupy = cupy
        self._device_id = device.device.index if device.device.index is not None else 0
        runtime = cupy.cuda.runtime
        with cupy.cuda.Device(self._device_id):
            self._device_bytes = cupy.from_dlpack(device.view(-1).view(torch.uint8))
            self._streams = {d: cupy.cuda.Stream(non_blocking=True) for d in DIRECTIONS}
        self._host: torch.Tensor | None = None
        try:
            runtime.hostRegister(host.data_ptr(), host.numel() * host.element_size(),
                                 _HOST_REGISTER_PORTABLE)
        except Exception:
            super().close()  # its workers; nothing was pinned
            raise
        self._host = host
        device_ptr, host_ptr = self._device_bytes.data.ptr, host.data_ptr()
        self._plan = {
            "out": (device_ptr, host_ptr, runtime.memcpyDeviceToHost),
            "in": (host_ptr, device_ptr, runtime.memcpyHostToDevice),
        }
        self._events: dict[int, tuple[Event, Event]] = {}

    def step_fence(self) -> Event:
        cuda = self._cupy.cuda
        compute = torch.cuda.current_stream(self._device_id).cuda_stream
        with cuda.Device(self._device_id):
            fence = cuda.Event(disable_timing=True)
            fence.record(cuda.ExternalStream(compute, self._device_id))
        return fence

    def _enqueue(self, swap: Swap[Event]) -> None:
        cuda = self._cupy.cuda
        direction = swap.ticket.direction
        src, dst, kind = self._plan[direction]
        stream = self._streams[direction]
        with cuda.Device(self._device_id):
            if swap.after is not None:
                stream.wait_event(swap.after)
            prev_events = self._events.get(swap.prev.id) if swap.prev is not None else None
            if prev_events is not None:  # absent: already finished on the GPU
                stream.wait_event(prev_events[1])
            start, end = cuda.Event(), cuda.Event(block=True)
            start.record(stream)
            for r in swap.ranges:
                cuda.runtime.memcpyAsync(dst + r.dst, src + r.src, r.nbytes, kind, stream.ptr)
            end.record(stream)
        self._events[swap.ticket.id] = (start, end)

    def _run(self, swap: Swap[Event]) -> float:
        cuda = self._cupy.cuda
        start, end = self._events[swap.ticket.id]
        try:
            with cuda.Device(self._device_id):
                end.synchronize()  # a blocking-sync event: the worker sleeps, it does not spin
                return cuda.get_elapsed_time(start, end) / 1e3
        finally:
            del self._events[swap.ticket.id]  # only now: later swaps of the request waited on it

    def close(self) -> None:
        """Also unpins the host cache and lets go of it, so the arena can be unmapped."""
        super().close()
        if self._host is not None:
            self._cupy.cuda.runtime.hostUnregister(self._host.data_ptr())
            self._host = None
