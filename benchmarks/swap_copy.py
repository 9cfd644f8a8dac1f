"""Swap bandwidth four ways, on the same KV volume in one run: vLLM's layer-major per-block
copies, per-block copies of a block-major cache, one copy per block group (at several group
lengths), and one raw memcpy; each direction alone and both at once.

  per_block    vLLM's swap (v0, and v1 before PR #27743): layer-major caches (one tensor per
               layer), one copy per 16-token block per layer per K/V
  block_major  vLLM v1 since PR #27743: the block-major cache, one copy per block (all layers,
               K and V)
  group_G      FastSwitch's: the block-major cache, one copy per block-group extent of G
               blocks, through the executor's real copy engine (submit, then wait)
  memcpy       one copy of a contiguous buffer of the same size: the physical limit

Ways: `out` (device to host), `in` (host to device) and `both`: one request goes out while
another comes in, each direction on its own stream (a context switch). The ratios per way
and group length are group/memcpy, group/per_block and group/block_major; the paper's
context-switch ratio is vLLM's time for `both` (layer-major, per block) over the group's at
`--headline-group`.

`--backend cpu` (default): "device" caches are CPU tensors, per-block copies are torch `copy_`
calls on the caller's thread, and the group goes through `CpuCopyEngine`. `--backend cupy`:
device caches are CUDA tensors; per-block copies are `cudaMemcpyAsync` calls issued from
Python on one non-blocking stream per direction (vLLM issues them from C++, a little cheaper
per copy) into pinned host memory; the group goes through `CupyCopyEngine`, which pins its
pageable host cache with `cudaHostRegister` exactly as it pins the KV store's arena. Every
timing ends when the copies have finished.

Each request's device blocks are block groups with free blocks between them, so groups do
not merge into one extent; its host blocks are one dense run. After timing, each method runs
once more into a zeroed destination and is checked byte for byte, so a wrong copy cannot
report a fast time. Methods take turns within each repeat, so drift in the machine's speed
hits all of them alike.

The machine may be shared: another process on one of the cores halves any CPU copy that uses
two threads (group, memcpy) and hardly slows a one-thread loop. The JSON records the load
average, the times of every repeat, and the best beside the median.

Run: .venv/bin/python benchmarks/swap_copy.py [--backend cupy] [--tokens 2048 --layers 32 ...]
     [--groups 1,2,4,8,16,32] [--ways out,in,both] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.cli import write_json
from common.kv.swap_plan import plan_copies
from services.executor.copy import CopyEngine, CpuCopyEngine, Direction
from services.executor.options import BACKENDS, DTYPE_NAMES

STATISTIC = "median"  # of the repeats' times; the best is reported beside it
RAW_METHODS = ("per_block", "block_major", "memcpy")  # beside group_G for each group length
WAYS: dict[str, tuple[Direction, ...]] = {"out": ("out",), "in": ("in",), "both": ("out", "in")}
GROUPS = (1, 2, 4, 8, 16, 32)
SCATTERED = 1  # the group length of the per-block ways' placement: vLLM's single blocks

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


def grouped_blocks(blocks: int, group_blocks: int) -> list[int]:
    """Device block ids of a request of `blocks` blocks held in groups of `group_blocks`,
    each group followed by a gap, so that no two groups merge into one extent."""
    stride = group_blocks + max(1, group_blocks // 4)
    groups = -(-blocks // group_blocks)
    return [g * stride + i for g in range(groups) for i in range(group_blocks)][:blocks]


@dataclass(frozen=True, slots=True)
class Layout:
    """Two requests of `blocks` blocks each. The one swapped out lives in device blocks
    `[0, region)` and goes to host blocks `[0, blocks)`; the one swapped in comes from host
    blocks `[blocks, 2 * blocks)` into device blocks `[region, 2 * region)`. So `both` ways
    never touch the same bytes, and sources are never written."""

    blocks: int
    region: int

    @classmethod
    def for_groups(cls, blocks: int, groups: Sequence[int]) -> Layout:
        return cls(blocks, max(grouped_blocks(blocks, g)[-1] + 1 for g in (SCATTERED, *groups)))

    @property
    def device_blocks(self) -> int:
        return 2 * self.region

    @property
    def host_blocks(self) -> int:
        return 2 * self.blocks

    def blocks_of(self, direction: Direction, group_blocks: int) -> tuple[list[int], list[int]]:
        """(device block ids, host block ids) of the request that moves in `direction`; the
        i-th of each hold the same KV."""
        device, host = grouped_blocks(self.blocks, group_blocks), list(range(self.blocks))
        if direction == "in":
            return [b + self.region for b in device], [b + self.blocks for b in host]
        return device, host


@dataclass(frozen=True, slots=True)
class Planes:
    """Device and host tensors in pairs whose dimension 0 is the block: one pair per layer and
    K/V for the layer-major cache, one pair for the block-major cache or the memcpy buffers."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    layout: Layout

    def fill(self) -> None:
        """Distinct 32-bit words everywhere, so a misplaced or missing byte range shows."""
        offset = 0
        for tensor in (t for pair in self.pairs for t in pair):
            words = tensor.view(-1).view(torch.int32)
            torch.arange(offset, offset + words.numel(), dtype=torch.int32, out=words)
            offset += words.numel()

    def copies(self, direction: Direction, group_blocks: int) -> list[Pair]:
        """One copy per block per pair."""
        device_ids, host_ids = self.layout.blocks_of(direction, group_blocks)
        return [
            (h[t], d[s]) if direction == "out" else (d[s], h[t])
            for d, h in self.pairs
            for s, t in zip(device_ids, host_ids, strict=True)
        ]

    def clear(self, direction: Direction, group_blocks: int) -> None:
        """Zeroes the blocks that `direction` writes."""
        device_ids, host_ids = self.layout.blocks_of(direction, group_blocks)
        for d, h in self.pairs:
            if direction == "out":
                h[host_ids] = 0
            else:
                d[device_ids] = 0

    def check(self, direction: Direction, group_blocks: int) -> bool:
        """The blocks `direction` moved are equal, bit for bit, on both sides."""
        device_ids, host_ids = self.layout.blocks_of(direction, group_blocks)
        return all(
            torch.equal(d[device_ids].cpu().view(torch.uint8), h[host_ids].view(torch.uint8))
            for d, h in self.pairs
        )


class Backend:
    """Where the device caches live, and how a batch of raw copies is issued and awaited."""

    name = "cpu"
    device = torch.device("cpu")

    def host_empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Host memory for the per-block ways and memcpy (pinned where that means anything)."""
        return torch.zeros(*shape, dtype=dtype)

    def batch(self, work: Mapping[Direction, Sequence[Pair]]) -> Callable[[], None]:
        """A callable that performs every copy and returns when all have finished."""

        def run() -> None:
            for pairs in work.values():
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
    """CUDA device caches; raw copies are `cudaMemcpyAsync`, on one non-blocking stream per
    direction, issued in order from this thread (out first when both go)."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy  # lazily: the CPU-only install has no CuPy

        if not torch.cuda.is_available():
            raise RuntimeError(f"--backend cupy needs a CUDA device; torch "
                               f"{torch.__version__} sees none")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._cupy = cupy
        with cupy.cuda.Device(self.device.index):
            self._streams = {d: cupy.cuda.Stream(non_blocking=True) for d in ("out", "in")}

    def host_empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, pin_memory=True)

    def batch(self, work: Mapping[Direction, Sequence[Pair]]) -> Callable[[], None]:
        runtime = self._cupy.cuda.runtime
        kinds = {"out": runtime.memcpyDeviceToHost, "in": runtime.memcpyHostToDevice}
        calls = []
        for direction, pairs in work.items():
            if not all(d.is_contiguous() and s.is_contiguous() for d, s in pairs):
                raise ValueError("raw copies need contiguous tensors")
            stream, kind = self._streams[direction], kinds[direction]
            calls += [(d.data_ptr(), s.data_ptr(), d.numel() * d.element_size(), kind,
                       stream.ptr) for d, s in pairs]
        streams = [self._streams[direction] for direction in work]

        def run() -> None:
            for call in calls:
                runtime.memcpyAsync(*call)
            for stream in streams:
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


def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class Method:
    way: str
    name: str
    copies: int
    run: Callable[[], None]
    check: Callable[[], bool]  # the destination holds exactly the source's bytes
    clear: Callable[[], None] = field(default=_nothing)  # zeroes the destination


@dataclass(frozen=True, slots=True)
class Timing:
    way: str
    name: str
    copies: int
    seconds: list[float]

    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def gbps(self, nbytes: int, statistic: str) -> float:
        pick = statistics.median if statistic == "median" else min
        return nbytes / pick(self.seconds) / 1e9


def _verification(
    planes: Planes, way: str, group_blocks: int
) -> tuple[Callable[[], bool], Callable[[], None]]:
    """The check and the clear of every direction of `way`, for `Method`."""
    directions = WAYS[way]

    def check() -> bool:
        return all(planes.check(d, group_blocks) for d in directions)

    def clear() -> None:
        for d in directions:
            planes.clear(d, group_blocks)

    return check, clear


def raw_method(backend: Backend, planes: Planes, way: str, name: str) -> Method:
    """One raw copy per block per pair of `planes`, placed as vLLM's single blocks are."""
    work = {d: planes.copies(d, SCATTERED) for d in WAYS[way]}
    copies = sum(len(pairs) for pairs in work.values())
    return Method(way, name, copies, backend.batch(work), *_verification(planes, way, SCATTERED))


def group_method(engine: CopyEngine[Any], planes: Planes, way: str, group_blocks: int) -> Method:
    """The copy engine, one copy per extent of `group_blocks` blocks (each direction a request
    of its own, so that both run at once)."""
    plans = {}
    for direction in WAYS[way]:
        device_ids, host_ids = planes.layout.blocks_of(direction, group_blocks)
        pair = (device_ids, host_ids) if direction == "out" else (host_ids, device_ids)
        plans[direction] = plan_copies(*pair)

    def run() -> None:
        tickets = [engine.submit(d, f"bench-{d}", plan) for d, plan in plans.items()]
        for ticket in tickets:
            completion = ticket.future.result()
            if completion.error is not None:
                raise RuntimeError(completion.error)

    copies = sum(len(plan) for plan in plans.values())
    name = f"group_{group_blocks}"
    return Method(way, name, copies, run, *_verification(planes, way, group_blocks))


def build_methods(
    backend: Backend, geometry: Geometry, layout: Layout, ways: Sequence[str],
    groups: Sequence[int], engines: ExitStack,
) -> list[Method]:
    """Every way's methods over one set of buffers per cache layout."""
    dtype, device = geometry.torch_dtype, backend.device
    layer_major = []
    for _ in range(geometry.layers):  # vLLM's `[2, num_blocks, block_size, kv_heads, head_dim]`
        d = torch.empty(2, layout.device_blocks, *geometry.slab_shape, dtype=dtype, device=device)
        h = backend.host_empty((2, layout.host_blocks, *geometry.slab_shape), dtype)
        layer_major += [(d[kv], h[kv]) for kv in range(2)]
    per_block = Planes(layer_major, layout)
    block_major = Planes([(
        torch.empty(layout.device_blocks, *geometry.block_shape, dtype=dtype, device=device),
        backend.host_empty((layout.host_blocks, *geometry.block_shape), dtype),
    )], layout)
    # Pageable host memory: the copy engine pins it itself, as it pins the KV store's arena.
    grouped = Planes([(
        torch.empty(layout.device_blocks, *geometry.block_shape, dtype=dtype, device=device),
        torch.zeros(layout.host_blocks, *geometry.block_shape, dtype=dtype),
    )], layout)
    nbytes = layout.blocks * geometry.block_bytes  # one contiguous buffer per direction
    memcpy = Planes([(torch.empty(2, nbytes, dtype=torch.uint8, device=device),
                      backend.host_empty((2, nbytes), torch.uint8))], Layout(1, 1))
    for planes in (per_block, block_major, grouped, memcpy):
        planes.fill()
    engine = engines.enter_context(backend.engine(*grouped.pairs[0]))
    methods = []
    for way in ways:
        methods += [
            raw_method(backend, per_block, way, "per_block"),
            raw_method(backend, block_major, way, "block_major"),
            *(group_method(engine, grouped, way, g) for g in groups),
            raw_method(backend, memcpy, way, "memcpy"),
        ]
    return methods


def measure(methods: Sequence[Method], repeats: int) -> list[Timing]:
    """Times every method `repeats` times in turns, then runs each once more into a zeroed
    destination and checks it (AssertionError names a method that copied wrong bytes)."""
    for method in methods:
        method.run()  # warm-up: thread start-up, caches
    seconds: dict[int, list[float]] = {i: [] for i in range(len(methods))}
    for repeat in range(repeats):
        print(f"  repeat {repeat + 1}/{repeats}", file=sys.stderr, flush=True)
        for i, method in enumerate(methods):
            start = time.perf_counter()
            method.run()
            seconds[i].append(time.perf_counter() - start)
    for method in methods:
        method.clear()
        method.run()
        if not method.check():
            raise AssertionError(f"{method.way} {method.name} copied the wrong bytes")
    return [Timing(m.way, m.name, m.copies, seconds[i]) for i, m in enumerate(methods)]


def way_report(timings: Sequence[Timing], nbytes: int, groups: Sequence[int]) -> dict[str, Any]:
    """One way's GB/s per method and the group's ratios to the others, per group length."""
    gbps = {t.name: t.gbps(nbytes, STATISTIC) for t in timings}
    group = {str(g): gbps[f"group_{g}"] for g in groups}
    return {
        "bytes": nbytes,
        **{f"{name}_gbps": gbps[name] for name in RAW_METHODS},
        "group_gbps": group,
        **{f"group_over_{name}": {g: v / gbps[name] for g, v in group.items()}
           for name in RAW_METHODS},
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


def table(way: str, timings: Sequence[Timing], nbytes: int, report: dict[str, Any]) -> str:
    """`way_report`'s figures as text."""
    lines = [f"swap-{way}", f"{'':14}{'copies':>8}{'median GB/s':>13}{'best GB/s':>11}"]
    lines += [f"{t.name:14}{t.copies:>8}{t.gbps(nbytes, 'median'):>13.2f}"
              f"{t.gbps(nbytes, 'best'):>11.2f}" for t in timings]
    for g, over in report["group_over_memcpy"].items():
        lines.append(f"  group_{g}: /memcpy {over:.2f}  /per_block "
                     f"{report['group_over_per_block'][g]:.2f}  /block_major "
                     f"{report['group_over_block_major'][g]:.2f}  ({STATISTIC}s)")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="cpu")
    parser.add_argument("--ways", default=",".join(WAYS),
                        help="comma list of out, in and both (out and in at once)")
    parser.add_argument("--groups", type=_int_list, default=list(GROUPS),
                        help="comma list of group lengths in blocks")
    parser.add_argument("--headline-group", type=int, default=16,
                        help="the group length of the context-switch ratio")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of each request")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float16")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    ways = [way.strip() for way in args.ways.split(",") if way.strip()]
    if not ways or set(ways) - set(WAYS):
        parser.error(f"--ways: a comma list of {', '.join(WAYS)}")
    if args.headline_group not in args.groups:
        parser.error(f"--headline-group {args.headline_group} is not in --groups")
    backend = make_backend(args.backend)
    geometry = Geometry(args.layers, args.block_size, args.kv_heads, args.head_dim, args.dtype)
    layout = Layout.for_groups(-(-args.tokens // args.block_size), args.groups)
    nbytes = layout.blocks * geometry.block_bytes
    load_before = os.getloadavg()[0]
    print(f"{args.backend}: requests of {layout.blocks} blocks x "
          f"{geometry.block_bytes / 2**20:.2f} MiB = {nbytes / 2**20:.0f} MiB; "
          f"load average {load_before:.2f}", file=sys.stderr, flush=True)
    with ExitStack() as engines:
        methods = build_methods(backend, geometry, layout, ways, args.groups, engines)
        backend.settle()
        timings = measure(methods, args.repeats)
    reports = {}
    for way in ways:
        mine = [t for t in timings if t.way == way]
        way_bytes = nbytes * len(WAYS[way])
        reports[way] = way_report(mine, way_bytes, args.groups)
        print(table(way, mine, way_bytes, reports[way]), flush=True)
    both = {t.name: t.median_s() for t in timings if t.way == "both"}
    switch = both["per_block"] / both[f"group_{args.headline_group}"] if both else None
    if switch is not None:
        print(f"context switch (one request out, one in), layer-major per block over "
              f"group_{args.headline_group}: {switch:.2f}x", flush=True)
    result: dict[str, object] = {
        **backend.describe(),
        "geometry": asdict(geometry),
        "tokens": layout.blocks * geometry.block_size,
        "blocks": layout.blocks,
        "block_bytes": geometry.block_bytes,
        "bytes": nbytes,
        "groups": args.groups,
        "headline_group": args.headline_group,
        "repeats": args.repeats,
        "statistic": STATISTIC,
        "load_average_1min_before": load_before,
        "directions": reports,
        "context_switch_ratio": switch,
    }
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
