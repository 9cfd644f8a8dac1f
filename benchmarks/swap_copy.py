"""Swap bandwidth four ways, on the same KV volume in one run, in both directions: vLLM's
layer-major per-block copies, per-block copies of a block-major cache, one copy per block
group, and one raw memcpy.

  per_block    vLLM's swap (v0, and v1 before PR #27743): layer-major caches (one tensor per
               layer), one copy per 16-token block per layer per K/V
  block_major  vLLM v1 since PR #27743: the block-major cache, one copy per block (all layers,
               K and V)
  group        FastSwitch's: the block-major cache, one copy per block-group extent, through the
               executor's real copy engine (submit, then wait for the completion)
  memcpy       one copy of a contiguous buffer of the same size: the physical limit

`--backend cpu` (default): "device" caches are CPU tensors, per-block copies are torch `copy_`
calls on the caller's thread, and the group goes through `CpuCopyEngine`. `--backend cupy`:
device caches are CUDA tensors; per-block copies are `cudaMemcpyAsync` calls issued from
Python on one non-blocking stream (vLLM issues them from C++, a little cheaper per copy) into
pinned host memory; the group goes through `CupyCopyEngine`, which pins its pageable host cache
with `cudaHostRegister` exactly as it pins the KV store's arena. Every timing ends when the
copies have finished.

The request's device blocks are block groups with free blocks between them, so groups do not
merge into one extent; its host blocks are one dense run. Each method's copy is checked
byte for byte after timing, so a wrong copy cannot report a fast time. Methods take turns
within each repeat, so drift in the machine's speed hits all of them alike.

The machine may be shared: another process on one of the cores halves any CPU copy that uses
two threads (group, memcpy) and hardly slows a one-thread loop. The JSON records the load
average, the times of every repeat, and the best beside the median.

Run: .venv/bin/python benchmarks/swap_copy.py [--backend cupy] [--tokens 2048 --layers 32 ...]
     [--direction both] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.cli import write_json
from common.kv.swap_plan import plan_copies
from services.executor.copy import CopyEngine, CpuCopyEngine, Direction

STATISTIC = "median"  # of the repeats' times; the best is reported beside it
METHODS = ("per_block", "block_major", "group", "memcpy")
BACKENDS = ("cpu", "cupy")

# A copy between two contiguous tensors of equal size: (destination, source).
Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class Geometry:
    layers: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: str = "float16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def slab_shape(self) -> tuple[int, int, int]:
        """One block of one layer's K (or V): the unit vLLM copies."""
        return (self.block_size, self.kv_heads, self.head_dim)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """One block of the block-major cache: all layers, K and V."""
        return (self.layers, 2, *self.slab_shape)

    @property
    def block_bytes(self) -> int:
        """One block across all layers, K and V: the unit of the block-major cache."""
        return torch.Size(self.block_shape).numel() * self.torch_dtype.itemsize


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the swapped request's blocks sit: device block `src[i]` and host block `dst[i]`
    hold the same KV (whichever way it is copied)."""

    src: list[int]
    dst: list[int]
    device_blocks: int

    @classmethod
    def in_groups(cls, blocks: int, group_blocks: int) -> Placement:
        groups = -(-blocks // group_blocks)
        stride = group_blocks + max(1, group_blocks // 4)  # a gap after each group
        src = [g * stride + i for g in range(groups) for i in range(group_blocks)][:blocks]
        return cls(src, list(range(blocks)), groups * stride)


class Backend:
    """Where the device caches live, and how a batch of raw copies is issued and awaited."""

    name = "cpu"
    device = torch.device("cpu")

    def host_empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Host memory for the per-block ways and memcpy (pinned where that means anything)."""
        return torch.zeros(*shape, dtype=dtype)

    def batch(self, pairs: Sequence[Pair], direction: Direction) -> Callable[[], None]:
        """A callable that performs every copy and returns when all have finished."""

        def run() -> None:
            for dst, src in pairs:
                dst.copy_(src)

        return run

    def engine(self, device: torch.Tensor, host: torch.Tensor) -> CopyEngine[Any]:
        return CpuCopyEngine(device, host)

    def settle(self) -> None:
        """Returns when the buffers' setup has finished (CPU setup finishes as it runs)."""

    def describe(self) -> dict[str, object]:
        return {"backend": self.name, "torch_threads": torch.get_num_threads()}


class CupyBackend(Backend):
    """CUDA device caches; raw copies are `cudaMemcpyAsync` on one non-blocking stream."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy  # lazily: the CPU-only install has no CuPy

        if not torch.cuda.is_available():
            raise RuntimeError(f"--backend cupy needs a CUDA device; torch "
                               f"{torch.__version__} sees none")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._cupy = cupy
        with cupy.cuda.Device(self.device.index):
            self._stream = cupy.cuda.Stream(non_blocking=True)

    def host_empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, pin_memory=True)

    def batch(self, pairs: Sequence[Pair], direction: Direction) -> Callable[[], None]:
        runtime, stream = self._cupy.cuda.runtime, self._stream
        kind = runtime.memcpyDeviceToHost if direction == "out" else runtime.memcpyHostToDevice
        if not all(d.is_contiguous() and s.is_contiguous() for d, s in pairs):
            raise ValueError("raw copies need contiguous tensors")
        triples = [(d.data_ptr(), s.data_ptr(), d.numel() * d.element_size()) for d, s in pairs]

        def run() -> None:
            for dst, src, nbytes in triples:
                runtime.memcpyAsync(dst, src, nbytes, kind, stream.ptr)
            stream.synchronize()

        return run

    def engine(self, device: torch.Tensor, host: torch.Tensor) -> CopyEngine[Any]:
        from services.executor.copy.cupy_backend import CupyCopyEngine

        return CupyCopyEngine(device, host)

    def settle(self) -> None:
        # The fills ran on torch's stream; the copy streams do not wait for it.
        torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, object]:
        runtime = self._cupy.cuda.runtime
        return {
            "backend": self.name,
            "device_name": torch.cuda.get_device_name(self.device),
            "cupy": self._cupy.__version__,
            "cuda_runtime": runtime.runtimeGetVersion(),
            "cuda_driver": runtime.driverGetVersion(),
            "torch": torch.__version__,
        }


def make_backend(name: str) -> Backend:
    return CupyBackend() if name == "cupy" else Backend()


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    copies: int
    run: Callable[[], None]
    check: Callable[[], bool]  # the destination holds exactly the source's bytes


@dataclass(frozen=True, slots=True)
class Timing:
    name: str
    copies: int
    seconds: list[float]

    def gbps(self, nbytes: int, statistic: str) -> float:
        pick = statistics.median if statistic == "median" else min
        return nbytes / pick(self.seconds) / 1e9


def _distinct(tensor: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Fills with distinct 32-bit words, so a misplaced or missing byte range shows."""
    words = tensor.view(-1).view(torch.int32)
    torch.arange(offset, offset + words.numel(), dtype=torch.int32, out=words)
    return tensor


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors of one shape, wherever each lives."""
    return torch.equal(a.cpu().view(torch.int16), b.cpu().view(torch.int16))


def _source_first(direction: Direction, device: torch.Tensor, host: torch.Tensor) -> None:
    """Gives the copy's source distinct words and zeroes its destination."""
    src, dst = (device, host) if direction == "out" else (host, device)
    _distinct(src)
    dst.zero_()


def _oriented(direction: Direction, device_side: torch.Tensor, host_side: torch.Tensor) -> Pair:
    return (host_side, device_side) if direction == "out" else (device_side, host_side)


def per_block_method(
    backend: Backend, direction: Direction, geometry: Geometry, placement: Placement
) -> Method:
    """vLLM's layout `[2, num_blocks, block_size, kv_heads, head_dim]` per layer."""
    dtype, host_blocks = geometry.torch_dtype, len(placement.dst)
    shape = (2, placement.device_blocks, *geometry.slab_shape)
    device = [
        torch.empty(shape, dtype=dtype, device=backend.device) for _ in range(geometry.layers)
    ]
    host = [backend.host_empty((2, host_blocks, *geometry.slab_shape), dtype) for _ in device]
    for device_layer, host_layer in zip(device, host, strict=True):
        _source_first(direction, device_layer, host_layer)
    # Views made ahead: only the copy calls are timed, as in vLLM's C++ loop over the mapping.
    pairs = [
        _oriented(direction, device_layer[kv, s], host_layer[kv, d])
        for device_layer, host_layer in zip(device, host, strict=True)
        for kv in range(2)
        for s, d in zip(placement.src, placement.dst, strict=True)
    ]

    def check() -> bool:
        return all(_equal(h, d[:, placement.src]) for d, h in zip(device, host, strict=True))

    return Method("per_block", len(pairs), backend.batch(pairs, direction), check)


def _block_major(
    backend: Backend, direction: Direction, geometry: Geometry, placement: Placement,
    host: torch.Tensor,
) -> tuple[torch.Tensor, Callable[[], bool]]:
    """The block-major device cache `[num_blocks, layers, 2, block_size, kv_heads, head_dim]`
    set up for one direction against `host`, and the check of the copied blocks."""
    device = torch.empty(placement.device_blocks, *geometry.block_shape,
                         dtype=geometry.torch_dtype, device=backend.device)
    _source_first(direction, device, host)
    return device, lambda: _equal(host, device[placement.src])


def block_major_method(
    backend: Backend, direction: Direction, geometry: Geometry, placement: Placement
) -> Method:
    """One raw copy per block of the block-major cache."""
    host = backend.host_empty((len(placement.dst), *geometry.block_shape), geometry.torch_dtype)
    device, check = _block_major(backend, direction, geometry, placement, host)
    pairs = [
        _oriented(direction, device[s], host[d])
        for s, d in zip(placement.src, placement.dst, strict=True)
    ]
    return Method("block_major", len(pairs), backend.batch(pairs, direction), check)


def group_method(
    backend: Backend, direction: Direction, geometry: Geometry, placement: Placement,
    engines: ExitStack,
) -> Method:
    """The block-major cache through the backend's copy engine, one copy per extent. The host
    cache is pageable memory that the engine pins itself (CuPy: `cudaHostRegister`)."""
    host = torch.zeros(len(placement.dst), *geometry.block_shape, dtype=geometry.torch_dtype)
    device, check = _block_major(backend, direction, geometry, placement, host)
    engine = engines.enter_context(backend.engine(device, host))
    if direction == "out":
        plan = plan_copies(placement.src, placement.dst)
    else:
        plan = plan_copies(placement.dst, placement.src)

    def run() -> None:
        completion = engine.submit(direction, "bench", plan).future.result()
        if completion.error is not None:
            raise RuntimeError(completion.error)

    return Method("group", len(plan), run, check)


def memcpy_method(backend: Backend, direction: Direction, nbytes: int) -> Method:
    device = torch.empty(nbytes, dtype=torch.uint8, device=backend.device)
    host = backend.host_empty((nbytes,), torch.uint8)
    _source_first(direction, device, host)
    dst, src = _oriented(direction, device, host)
    return Method("memcpy", 1, backend.batch([(dst, src)], direction), lambda: _equal(dst, src))


def measure(methods: Sequence[Method], repeats: int) -> list[Timing]:
    for method in methods:
        method.run()  # warm-up: thread start-up, caches
    seconds: dict[str, list[float]] = {method.name: [] for method in methods}
    for repeat in range(repeats):
        print(f"  repeat {repeat + 1}/{repeats}", file=sys.stderr, flush=True)
        for method in methods:
            start = time.perf_counter()
            method.run()
            seconds[method.name].append(time.perf_counter() - start)
    for method in methods:
        if not method.check():
            raise AssertionError(f"{method.name} copied the wrong bytes")
    return [Timing(m.name, m.copies, seconds[m.name]) for m in methods]


def run_direction(
    backend: Backend, direction: Direction, geometry: Geometry, placement: Placement,
    repeats: int,
) -> list[Timing]:
    """Allocates every method's buffers for one direction, times them, and frees them."""
    nbytes = len(placement.src) * geometry.block_bytes
    with ExitStack() as engines:
        methods = [
            per_block_method(backend, direction, geometry, placement),
            block_major_method(backend, direction, geometry, placement),
            group_method(backend, direction, geometry, placement, engines),
            memcpy_method(backend, direction, nbytes),
        ]
        backend.settle()
        return measure(methods, repeats)


def direction_report(timings: list[Timing], nbytes: int) -> dict[str, object]:
    gbps = {t.name: t.gbps(nbytes, STATISTIC) for t in timings}
    return {
        **{f"{name}_gbps": gbps[name] for name in METHODS},
        "group_over_per_block": gbps["group"] / gbps["per_block"],
        "group_over_block_major": gbps["group"] / gbps["block_major"],
        "group_over_memcpy": gbps["group"] / gbps["memcpy"],
        "methods": {
            t.name: {
                "copies": t.copies,
                "seconds": t.seconds,
                "median_gbps": t.gbps(nbytes, "median"),
                "best_gbps": t.gbps(nbytes, "best"),
            }
            for t in timings
        },
    }


def table(timings: list[Timing], nbytes: int) -> str:
    gbps = {t.name: t.gbps(nbytes, STATISTIC) for t in timings}
    lines = [f"{'':12}{'copies':>8}{'median GB/s':>13}{'best GB/s':>11}"]
    for t in timings:
        lines.append(
            f"{t.name:12}{t.copies:>8}{t.gbps(nbytes, 'median'):>13.2f}"
            f"{t.gbps(nbytes, 'best'):>11.2f}"
        )
    lines.append(
        f"group/per_block {gbps['group'] / gbps['per_block']:.2f}   "
        f"group/block_major {gbps['group'] / gbps['block_major']:.2f}   "
        f"group/memcpy {gbps['group'] / gbps['memcpy']:.2f}   ({STATISTIC}s)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="cpu")
    parser.add_argument("--direction", choices=("out", "in", "both"), default="both")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens swapped")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--group", type=int, default=16, help="blocks per block group")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    backend = make_backend(args.backend)
    geometry = Geometry(args.layers, args.block_size, args.kv_heads, args.head_dim)
    placement = Placement.in_groups(-(-args.tokens // args.block_size), args.group)
    directions: list[Direction] = ["out", "in"] if args.direction == "both" else [args.direction]
    nbytes = len(placement.src) * geometry.block_bytes
    load_before = os.getloadavg()[0]
    print(
        f"{args.backend}: swaps of {len(placement.src)} blocks x "
        f"{geometry.block_bytes / 2**20:.2f} MiB = {nbytes / 2**20:.0f} MiB; "
        f"load average {load_before:.2f}",
        file=sys.stderr,
        flush=True,
    )
    result: dict[str, object] = {
        **backend.describe(),
        "geometry": asdict(geometry),
        "tokens": len(placement.src) * geometry.block_size,
        "blocks": len(placement.src),
        "block_bytes": geometry.block_bytes,
        "bytes": nbytes,
        "group_blocks": args.group,
        "repeats": args.repeats,
        "statistic": STATISTIC,
        "load_average_1min_before": load_before,
    }
    reports = {}
    for direction in directions:
        print(f"swap-{direction}: allocating", file=sys.stderr, flush=True)
        timings = run_direction(backend, direction, geometry, placement, args.repeats)
        print(f"swap-{direction}\n{table(timings, nbytes)}", flush=True)
        reports[direction] = direction_report(timings, nbytes)
    result["directions"] = reports
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
