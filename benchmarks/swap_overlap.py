"""Decode step time with swaps in flight against without, and copy bandwidth with decoding
against without: the executor engine in process, on a random-weight model.

The model is `--model` (LLaMA-3-8B's shape by default) with its first `--layers` layers and
random weights built in place on the device (benchmarks/random_model.py). A batch of
`--batch` sequences is prefilled with `--prompt` tokens each, then three phases run:

  quiet   `--steps` decode steps (one token per sequence), no swaps;
  busy    `--steps` decode steps while one swap-out and one swap-in of `--swap-mib` each are
          kept in flight the whole phase (each resubmitted the moment it completes), on
          blocks the batch does not use;
  copies  the same swaps alone, with no steps, until `--idle-swaps` have completed in each
          direction.

Steps run on a worker thread, as in the executor service, so completions are handled while a
step runs. The report gives each phase's median step time, busy over quiet (the goal: at
most 1.10), and each direction's copy GB/s in the busy and the copies phase.

Run: .venv/bin/python -m benchmarks.swap_overlap [--backend cupy] [--model toy --layers 2]
     [--dtype bfloat16] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.cli import write_json
from benchmarks.random_model import MODELS, random_decoder
from common.kv.swap_plan import SwapOrder, plan_copies
from common.shm.arena import HostArena
from services.executor.copy import Direction
from services.executor.engine import (
    ExecutorEngine,
    StepSequence,
    SwapDone,
    copy_engine_factory,
)
from services.executor.model import KVCacheGeometry
from services.executor.options import BACKENDS, DTYPE_NAMES

BLOCK_SIZE = 16
WARMUP_STEPS = 3
GOAL = 1.10  # busy median step time over quiet, at most
DIRECTIONS: tuple[Direction, ...] = ("out", "in")


class SwapKeeper:
    """While `running`, keeps one swap per direction in flight: device blocks
    `[first, first + blocks)` go out to host `[0, blocks)`, and host `[blocks, 2 * blocks)`
    come in to device `[first + blocks, first + 2 * blocks)`. Counts what completed since the
    last `start()`, per direction."""

    def __init__(self, engine: ExecutorEngine, first: int, blocks: int) -> None:
        self._engine = engine
        self._copies = {
            "out": tuple(plan_copies(range(first, first + blocks), range(blocks))),
            "in": tuple(plan_copies(range(blocks, 2 * blocks),
                                    range(first + blocks, first + 2 * blocks))),
        }
        self._next_id = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._progress = asyncio.Event()
        self.in_flight = 0
        self.running = False
        self.done = dict.fromkeys(DIRECTIONS, 0)
        self.bytes = dict.fromkeys(DIRECTIONS, 0)
        self.seconds = dict.fromkeys(DIRECTIONS, 0.0)
        self.errors: list[str] = []

    def start(self) -> None:
        """Zeroes the counts and starts one swap per direction."""
        self.running = True
        for direction in DIRECTIONS:
            self.done[direction], self.bytes[direction], self.seconds[direction] = 0, 0, 0.0
            self._submit(direction)

    async def stop(self) -> None:
        """Stops resubmitting and returns when the last swap has completed."""
        self.running = False
        await self._idle.wait()

    async def wait_for(self, swaps: int) -> None:
        """Returns once each direction has completed `swaps`, or a swap failed."""
        while min(self.done.values()) < swaps and not self.errors:
            self._progress.clear()
            await self._progress.wait()

    def report(self) -> dict[str, dict[str, float | None]]:
        """Per direction since `start()`: swaps done, bytes and GB/s over copy time."""
        return {d: {"swaps": self.done[d], "bytes": self.bytes[d],
                    "gbps": self.bytes[d] / self.seconds[d] / 1e9 if self.seconds[d] else None}
                for d in DIRECTIONS}

    def _submit(self, direction: Direction) -> None:
        self._next_id += 1
        self.in_flight += 1
        self._idle.clear()
        self._engine.submit_swaps(
            [SwapOrder(self._next_id, f"keeper-{direction}", direction, self._copies[direction])]
        )

    def on_done(self, done: SwapDone) -> None:
        """Counts a completion and resubmits its direction; a failed swap is recorded in
        `errors` and stops its direction."""
        self.in_flight -= 1
        if done.error is not None:
            self.errors.append(f"swap {done.swap_id} ({done.direction}): {done.error}")
        else:
            self.done[done.direction] += 1
            self.bytes[done.direction] += done.bytes
            self.seconds[done.direction] += done.duration_s
            if self.running:
                self._submit(done.direction)
        self._progress.set()
        if self.in_flight == 0:
            self._idle.set()


def build_engine(args: argparse.Namespace, used_blocks: int) -> tuple[ExecutorEngine, int]:
    """The engine over a random `--model`, with `used_blocks` for the batch and room for both
    swaps after them, and the number of blocks each swap moves."""
    copy_engine = copy_engine_factory(args.backend)  # fails fast, before the model is built
    device = torch.device("cuda" if args.backend == "cupy" else "cpu")
    config = MODELS[args.model](num_layers=args.layers)
    dtype = getattr(torch, args.dtype)
    block_bytes = KVCacheGeometry.for_model(config, num_blocks=1, block_size=BLOCK_SIZE,
                                            dtype=dtype).block_bytes
    swap_blocks = max(1, int(args.swap_mib * 2**20) // block_bytes)
    geometry = KVCacheGeometry.for_model(config, num_blocks=used_blocks + 2 * swap_blocks,
                                         block_size=BLOCK_SIZE, dtype=dtype)
    model = random_decoder(config, dtype=dtype, device=device)
    engine = ExecutorEngine(config, model, geometry.allocate(device), backend=args.backend,
                            copy_engine=copy_engine, fingerprint=f"random-{args.model}")
    return engine, swap_blocks


async def measure(args: argparse.Namespace) -> dict[str, object]:
    """Runs the three phases on a fresh engine; the result is what `--json` writes."""
    tokens = args.prompt + WARMUP_STEPS + 2 * args.steps
    per_seq = -(-tokens // BLOCK_SIZE)
    used = args.batch * per_seq
    engine, swap_blocks = build_engine(args, used)
    vocab = engine.config.vocab_size
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(args.batch)]
    position = 0

    async def step(token_ids: Sequence[int]) -> float:
        nonlocal position
        claim = engine.begin_step([
            StepSequence(f"seq-{i}", table, position, token_ids, sample=True)
            for i, table in enumerate(tables)
        ])
        result = await asyncio.to_thread(engine.run_step, claim)
        position += len(token_ids)
        return result.duration_s

    seconds: dict[str, list[float]] = {"quiet": [], "busy": []}
    with HostArena.local(2 * swap_blocks, engine.geometry.block_bytes) as arena:
        engine.attach_host_arena(arena.name)
        keeper = SwapKeeper(engine, used, swap_blocks)
        with engine.subscribe() as completions:

            async def relay() -> None:
                async for done in completions:
                    keeper.on_done(done)  # type: ignore[arg-type]  # the hub relays SwapDone

            relaying = asyncio.create_task(relay())
            await step([1 + i % (vocab - 1) for i in range(args.prompt)])
            for _ in range(WARMUP_STEPS):
                await step([1])
            for phase in ("quiet", "busy"):
                print(f"  {phase}: {args.steps} steps", file=sys.stderr, flush=True)
                if phase == "busy":
                    keeper.start()
                for _ in range(args.steps):
                    seconds[phase].append(await step([1]))
            await keeper.stop()
            busy_copies = keeper.report()
            print(f"  copies: {args.idle_swaps} swaps each way", file=sys.stderr, flush=True)
            keeper.start()
            await keeper.wait_for(args.idle_swaps)
            await keeper.stop()
            relaying.cancel()
        engine.close()
    if keeper.errors:
        raise RuntimeError(f"{len(keeper.errors)} swaps failed, first: {keeper.errors[0]}")
    quiet, busy = (statistics.median(seconds[phase]) for phase in ("quiet", "busy"))
    alone = keeper.report()
    return {
        "backend": args.backend,
        "model": args.model,
        "layers": args.layers,
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_tokens": args.prompt,
        "steps_per_phase": args.steps,
        "swap_blocks": swap_blocks,
        "swap_bytes": swap_blocks * engine.geometry.block_bytes,
        "block_bytes": engine.geometry.block_bytes,
        "quiet_step_median_s": quiet,
        "busy_step_median_s": busy,
        "busy_over_quiet": busy / quiet,
        "goal_busy_over_quiet_at_most": GOAL,
        "copies_while_decoding": busy_copies,
        "copies_alone": alone,
        "copy_gbps_while_over_alone": {
            d: _ratio(busy_copies[d]["gbps"], alone[d]["gbps"]) for d in DIRECTIONS
        },
        "step_seconds": seconds,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=4, help="of the model's layers")
    parser.add_argument("--dtype", choices=DTYPE_NAMES,
                        default="bfloat16")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--prompt", type=int, default=512, help="tokens prefilled per sequence")
    parser.add_argument("--steps", type=int, default=30, help="decode steps per phase")
    parser.add_argument("--swap-mib", type=float, default=128, help="MiB per swap")
    parser.add_argument("--idle-swaps", type=int, default=3,
                        help="swaps per direction in the copies phase")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args))
    copy = {phase: ", ".join(f"{d} {r['gbps'] or 0:.2f}" for d, r in result[phase].items())
            for phase in ("copies_while_decoding", "copies_alone")}
    print(
        f"median step: quiet {result['quiet_step_median_s'] * 1e3:.2f} ms, busy "
        f"{result['busy_step_median_s'] * 1e3:.2f} ms, busy/quiet "
        f"{result['busy_over_quiet']:.3f} (goal <= {GOAL}); copy GB/s while decoding: "
        f"{copy['copies_while_decoding']}; alone: {copy['copies_alone']}"
    )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
