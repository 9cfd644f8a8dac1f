"""Achieved swap-out bandwidth of the CPU copy engine, by copy granularity, in one run.

Rows, all moving the same bytes from the device cache into the host cache:
  block groups     the engine, one copy per extent (FastSwitch's block-group allocator)
  engine per block the engine, one copy per block (the single-block allocator's plan)
  layer-major      one copy per block per layer per K/V through per-layer strided views,
                   synchronously on the caller's thread (vLLM's swap)
  raw memcpy       one torch copy of a contiguous buffer of the same size (the ceiling)

Run: .venv/bin/python benchmarks/copy_bandwidth.py [--layers 32 --blocks 128 --group 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.kv.swap_plan import Copy, plan_copies
from services.executor.copy import CpuCopyEngine


@dataclass(frozen=True, slots=True)
class Geometry:
    layers: int
    block_size: int
    kv_heads: int
    head_dim: int

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.layers, 2, self.block_size, self.kv_heads, self.head_dim)


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    copies: int
    seconds: float


def _median_seconds(run: Callable[[], None], repeats: int) -> float:
    run()  # warm-up: first touch of the pages, thread start-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _swap_out(engine: CpuCopyEngine, plan: list[Copy]) -> Callable[[], None]:
    def run() -> None:
        completion = engine.wait(engine.submit("out", "bench", plan))
        if completion.error is not None:
            raise RuntimeError(completion.error)

    return run


def measure(geometry: Geometry, blocks: int, group: int, repeats: int) -> list[Row]:
    groups = -(-blocks // group)
    stride = group + group // 4  # gaps between groups, so groups do not merge on the device
    device_blocks = groups * stride
    device = torch.empty(device_blocks, *geometry.block_shape, dtype=torch.float16)
    words = device.view(-1).view(torch.int32)  # distinct everywhere, so misplaced bytes show
    words.copy_(torch.arange(words.numel(), dtype=torch.int32))
    host = torch.zeros(blocks, *geometry.block_shape, dtype=torch.float16)
    src = [g * stride + i for g in range(groups) for i in range(group)][:blocks]
    dst = list(range(blocks))
    rows: list[Row] = []

    with CpuCopyEngine(device, host) as engine:
        for name, merge in (("block groups", True), ("engine per block", False)):
            plan = plan_copies(src, dst, merge=merge)
            rows.append(Row(name, len(plan), _median_seconds(_swap_out(engine, plan), repeats)))

    device_layers = [device[:, layer] for layer in range(geometry.layers)]
    host_layers = [host[:, layer] for layer in range(geometry.layers)]

    def layer_major() -> None:
        for device_layer, host_layer in zip(device_layers, host_layers, strict=True):
            for kv in range(2):
                for s, d in zip(src, dst, strict=True):
                    host_layer[d, kv].copy_(device_layer[s, kv])

    rows.append(Row("layer-major", blocks * geometry.layers * 2,
                    _median_seconds(layer_major, repeats)))
    if not torch.equal(host.view(torch.int16), device[src].view(torch.int16)):
        raise AssertionError("the swap copied the wrong bytes")

    raw_dst = host.view(-1).view(torch.uint8)
    raw_src = device.view(-1).view(torch.uint8)[: raw_dst.numel()]
    rows.append(Row("raw memcpy", 1, _median_seconds(lambda: raw_dst.copy_(raw_src), repeats)))
    return rows


def report(rows: list[Row], nbytes: int) -> str:
    raw = next(row for row in rows if row.name == "raw memcpy")
    groups = rows[0]
    lines = [f"{'':18}{'copies':>8}{'ms':>10}{'GB/s':>9}{'of raw':>9}{'groups x':>10}"]
    for row in rows:
        lines.append(
            f"{row.name:18}{row.copies:>8}{row.seconds * 1e3:>10.2f}"
            f"{nbytes / row.seconds / 1e9:>9.2f}{raw.seconds / row.seconds:>9.2f}"
            f"{row.seconds / groups.seconds:>10.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=128, help="blocks per swap")
    parser.add_argument("--group", type=int, default=16, help="blocks per block group")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    geometry = Geometry(args.layers, args.block_size, args.kv_heads, args.head_dim)
    block_bytes = 2 * torch.Size(geometry.block_shape).numel()
    nbytes = args.blocks * block_bytes
    print(
        f"swap of {args.blocks} blocks x {block_bytes / 2**20:.2f} MiB = "
        f"{nbytes / 2**20:.0f} MiB in groups of {args.group}; {geometry.layers} layers; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(report(measure(geometry, args.blocks, args.group, args.repeats), nbytes))


if __name__ == "__main__":
    main()
