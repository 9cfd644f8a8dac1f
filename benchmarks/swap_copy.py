"""Swap-out bandwidth three ways, on the same KV volume in one run: per block, per block group,
and one raw memcpy.

  per_block  vLLM's swap: layer-major caches (one tensor per layer), one copy per 16-token block
             per layer per K/V, issued one after another on the caller's thread
  group      FastSwitch's: the block-major cache, one copy per block-group extent, through the
             executor's real CPU copy engine (submit, then wait for the completion)
  memcpy     one torch `copy_` of a contiguous buffer of the same size: the physical limit

The request's device blocks are block groups with free blocks between them, so groups do not
merge into one extent; its host blocks are one dense run. Each method's copy is checked
byte for byte after timing, so a wrong copy cannot report a fast time. Methods take turns
within each repeat, so drift in the machine's speed hits all three alike.

The machine may be shared: another process on one of the cores halves any copy that uses two
threads (group, memcpy) and hardly slows a one-thread loop (per_block). The JSON records the
load average, the times of every repeat, and the best beside the median.

Run: .venv/bin/python benchmarks/swap_copy.py [--tokens 2048 --layers 32 ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.kv.swap_plan import plan_copies
from services.executor.copy import CpuCopyEngine

STATISTIC = "median"  # of the repeats' times; the best is reported beside it


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
    def block_bytes(self) -> int:
        """One block across all layers, K and V: the unit of the block-major cache."""
        return self.layers * 2 * torch.Size(self.slab_shape).numel() * self.torch_dtype.itemsize


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the swapped request's blocks sit: `src[i]` on the device goes to `dst[i]` on the
    host."""

    src: list[int]
    dst: list[int]
    device_blocks: int

    @classmethod
    def in_groups(cls, blocks: int, group_blocks: int) -> Placement:
        groups = -(-blocks // group_blocks)
        stride = group_blocks + max(1, group_blocks // 4)  # a gap after each group
        src = [g * stride + i for g in range(groups) for i in range(group_blocks)][:blocks]
        return cls(src, list(range(blocks)), groups * stride)


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


def per_block_method(geometry: Geometry, placement: Placement) -> Method:
    """vLLM's layout `[2, num_blocks, block_size, kv_heads, head_dim]` per layer."""
    dtype, host_blocks = geometry.torch_dtype, len(placement.dst)
    shape = (2, placement.device_blocks, *geometry.slab_shape)
    layer_words = torch.Size(shape).numel() * dtype.itemsize // 4
    device = [
        _distinct(torch.empty(shape, dtype=dtype), layer * layer_words)
        for layer in range(geometry.layers)
    ]
    host = [torch.zeros(2, host_blocks, *geometry.slab_shape, dtype=dtype) for _ in device]
    # Views made ahead: only the copy calls are timed, as in vLLM's C++ loop over the mapping.
    pairs = [
        (host_layer[kv, d], device_layer[kv, s])
        for device_layer, host_layer in zip(device, host, strict=True)
        for kv in range(2)
        for s, d in zip(placement.src, placement.dst, strict=True)
    ]

    def run() -> None:
        for dst, src in pairs:
            dst.copy_(src)

    def check() -> bool:
        return all(
            torch.equal(h.view(torch.int16), d[:, placement.src].view(torch.int16))
            for d, h in zip(device, host, strict=True)
        )

    return Method("per_block", len(pairs), run, check)


def group_method(geometry: Geometry, placement: Placement, engines: ExitStack) -> Method:
    """The block-major cache `[num_blocks, layers, 2, block_size, kv_heads, head_dim]`."""
    shape = (geometry.layers, 2, *geometry.slab_shape)
    device = _distinct(torch.empty(placement.device_blocks, *shape, dtype=geometry.torch_dtype))
    host = torch.zeros(len(placement.dst), *shape, dtype=geometry.torch_dtype)
    engine = engines.enter_context(CpuCopyEngine(device, host))
    plan = plan_copies(placement.src, placement.dst)

    def run() -> None:
        completion = engine.wait(engine.submit("out", "bench", plan))
        if completion.error is not None:
            raise RuntimeError(completion.error)

    def check() -> bool:
        return torch.equal(host.view(torch.int16), device[placement.src].view(torch.int16))

    return Method("group", len(plan), run, check)


def memcpy_method(nbytes: int) -> Method:
    src = _distinct(torch.empty(nbytes, dtype=torch.uint8))
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    return Method("memcpy", 1, lambda: dst.copy_(src), lambda: torch.equal(dst, src))


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


def report(
    geometry: Geometry,
    placement: Placement,
    group_blocks: int,
    repeats: int,
    load_before: float,
    timings: list[Timing],
) -> dict[str, object]:
    nbytes = len(placement.src) * geometry.block_bytes
    gbps = {t.name: t.gbps(nbytes, STATISTIC) for t in timings}
    return {
        "geometry": asdict(geometry),
        "tokens": len(placement.src) * geometry.block_size,
        "blocks": len(placement.src),
        "block_bytes": geometry.block_bytes,
        "bytes": nbytes,
        "group_blocks": group_blocks,
        "repeats": repeats,
        "statistic": STATISTIC,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_before": load_before,
        "per_block_gbps": gbps["per_block"],
        "group_gbps": gbps["group"],
        "memcpy_gbps": gbps["memcpy"],
        "group_over_per_block": gbps["group"] / gbps["per_block"],
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
    lines = [f"{'':10}{'copies':>8}{'median GB/s':>13}{'best GB/s':>11}"]
    for t in timings:
        lines.append(
            f"{t.name:10}{t.copies:>8}{t.gbps(nbytes, 'median'):>13.2f}"
            f"{t.gbps(nbytes, 'best'):>11.2f}"
        )
    lines.append(
        f"group/per_block {gbps['group'] / gbps['per_block']:.2f}   "
        f"group/memcpy {gbps['group'] / gbps['memcpy']:.2f}   ({STATISTIC}s)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens swapped out")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--group", type=int, default=16, help="blocks per block group")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    geometry = Geometry(args.layers, args.block_size, args.kv_heads, args.head_dim)
    placement = Placement.in_groups(-(-args.tokens // args.block_size), args.group)
    nbytes = len(placement.src) * geometry.block_bytes
    load_before = os.getloadavg()[0]
    print(
        f"swap-out of {len(placement.src)} blocks x {geometry.block_bytes / 2**20:.2f} MiB = "
        f"{nbytes / 2**20:.0f} MiB; torch threads {torch.get_num_threads()}; "
        f"load average {load_before:.2f}; allocating",
        file=sys.stderr,
        flush=True,
    )
    with ExitStack() as engines:
        methods = [
            per_block_method(geometry, placement),
            group_method(geometry, placement, engines),
            memcpy_method(nbytes),
        ]
        timings = measure(methods, args.repeats)
    print(table(timings, nbytes))
    result = report(geometry, placement, args.group, args.repeats, load_before, timings)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
