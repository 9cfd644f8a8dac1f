"""Step time with swaps in flight against without: the executor engine in process.

A batch of sequences is prefilled, then decodes one token each per step, `--steps` steps in
each of two phases: *quiet* (no swaps) and *busy* (one swap-out and one swap-in, each of
`--swap-blocks` blocks the batch does not use, kept in flight the whole phase: each is
resubmitted the moment it completes). Steps run on a worker thread, as in the executor
service, so completions are handled while a step runs. The report gives each phase's median
step time, busy over quiet (the goal: at most 1.10), and what the swaps moved meanwhile.

Run: .venv/bin/python -m benchmarks.swap_overlap [--backend cupy] [--checkpoint DIR]
     [--dtype bfloat16] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.cli import write_json
from common.kv.swap_plan import SwapOrder, plan_copies
from common.shm.arena import HostArena
from services.executor.__main__ import DTYPES
from services.executor.copy import Direction
from services.executor.engine import ExecutorEngine, StepSequence, SwapDone
from services.executor.model.tiny_checkpoint import tiny_checkpoint

BLOCK_SIZE = 16
WARMUP_STEPS = 3
GOAL = 1.10  # busy median step time over quiet, at most


class SwapKeeper:
    """While `running`, keeps one swap per direction in flight: device blocks
    `[first, first + blocks)` go out to host `[0, blocks)`, and host `[blocks, 2 * blocks)`
    come in to device `[first + blocks, first + 2 * blocks)`."""

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
        self.in_flight = 0
        self.running = False
        self.done = 0
        self.bytes = 0
        self.seconds = 0.0
        self.errors: list[str] = []

    def start(self) -> None:
        self.running = True
        for direction in ("out", "in"):
            self._submit(direction)

    async def stop(self) -> None:
        """Stops resubmitting and returns when the last swap has completed."""
        self.running = False
        await self._idle.wait()

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
            self.done += 1
            self.bytes += done.bytes
            self.seconds += done.duration_s
            if self.running:
                self._submit(done.direction)
        if self.in_flight == 0:
            self._idle.set()


async def measure(args: argparse.Namespace, checkpoint: Path) -> dict[str, object]:
    """Runs both phases on a fresh engine; the result is what `--json` writes."""
    tokens = args.prompt + WARMUP_STEPS + 2 * args.steps
    per_seq = -(-tokens // BLOCK_SIZE)
    used = args.batch * per_seq
    engine = ExecutorEngine.load(
        checkpoint, num_gpu_blocks=used + 2 * args.swap_blocks, block_size=BLOCK_SIZE,
        backend=args.backend, dtype=DTYPES[args.dtype],
    )
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
    with HostArena.local(2 * args.swap_blocks, engine.geometry.block_bytes) as arena:
        engine.attach_host_arena(arena.name)
        keeper = SwapKeeper(engine, used, args.swap_blocks)
        with engine.subscribe() as completions:

            async def relay() -> None:
                async for done in completions:
                    keeper.on_done(done)  # type: ignore[arg-type]  # the hub relays SwapDone

            relaying = asyncio.create_task(relay())
            await step(list(range(1, args.prompt + 1)))
            for _ in range(WARMUP_STEPS):
                await step([1])
            for phase in ("quiet", "busy"):
                print(f"  {phase}: {args.steps} steps", file=sys.stderr, flush=True)
                if phase == "busy":
                    keeper.start()
                for _ in range(args.steps):
                    seconds[phase].append(await step([1]))
            await keeper.stop()
            relaying.cancel()
        engine.close()
    if keeper.errors:
        raise RuntimeError(f"{len(keeper.errors)} swaps failed, first: {keeper.errors[0]}")
    quiet, busy = (statistics.median(seconds[phase]) for phase in ("quiet", "busy"))
    return {
        "backend": args.backend,
        "checkpoint": str(checkpoint),
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_tokens": args.prompt,
        "steps_per_phase": args.steps,
        "swap_blocks": args.swap_blocks,
        "block_bytes": engine.geometry.block_bytes,
        "quiet_step_median_s": quiet,
        "busy_step_median_s": busy,
        "busy_over_quiet": busy / quiet,
        "goal_busy_over_quiet_at_most": GOAL,
        "busy_swaps_done": keeper.done,
        "busy_swap_bytes": keeper.bytes,
        "busy_swap_gbps": keeper.bytes / keeper.seconds / 1e9 if keeper.seconds else None,
        "step_seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["cpu", "cupy"], default="cpu")
    parser.add_argument("--checkpoint", type=Path, help="HF folder (default: the tiny model)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--prompt", type=int, default=256, help="tokens prefilled per sequence")
    parser.add_argument("--steps", type=int, default=50, help="decode steps per phase")
    parser.add_argument("--swap-blocks", type=int, default=64, help="blocks per swap")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args, args.checkpoint or tiny_checkpoint()))
    print(
        f"median step: quiet {result['quiet_step_median_s'] * 1e3:.2f} ms, busy "
        f"{result['busy_step_median_s'] * 1e3:.2f} ms, busy/quiet "
        f"{result['busy_over_quiet']:.3f} (goal <= {GOAL}); {result['busy_swaps_done']} "
        f"swaps moved {result['busy_swap_bytes'] / 2**20:.0f} MiB meanwhile"
    )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
