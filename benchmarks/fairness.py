"""The fairness report: what the policies promise, measured, in every scheduler mode.

1. **VTC** (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24): clients of
   unequal demand, all backlogged. While two clients are both backlogged, the service each
   receives (`input_weight` per prefill token plus `output_weight` per generated token) may
   differ by at most 2U, U = max(input_weight * longest prompt, output_weight * M), M the
   tokens the device's KV holds (the paper's Theorem 4.3). Reported: the largest gap over
   every interval in which all clients are backlogged, the bound, and Jain's index
   (sum x)^2 / (n sum x^2) of the service in that window (1: equal). FCFS runs the same
   load as a contrast.
2. **Priority** with `max_num_seqs` as the binding limit (device KV to spare): a
   higher-priority request must not wait while a lower-priority one runs (vllm#40004 asks
   for the same in vLLM). Reported: steps in which a strictly higher-priority request
   waited while a lower-priority one ran (`StepPlan.inverted`, the core's one definition),
   and the high-priority turns' TTFT.
3. **Charged once**: a request's prompt and output tokens are charged to the policy at most
   once, even when a preemption makes them be computed again. Reported: tokens charged
   beyond that, and the preemptions by recompute that could cause it.

The simulator (default) runs the real planner on a virtual clock; `--stack` also runs part 1
through the real CPU stack, where service is counted per token as the clients saw it and a
client is backlogged while it has a request unfinished (`benchmarks.stack_fairness`, as
`benchmarks.stack` reports it). Writes JSON with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.cli import parse_modes
from benchmarks.sim.fairness_stats import jain, largest_gap
from benchmarks.sim.hardware import A10, LLAMA3_8B, Deployment
from benchmarks.sim.simulate import SimOptions, simulate
from benchmarks.sim.workload import TurnSpec
from benchmarks.stack_fairness import stack_fairness
from benchmarks.stack_trace import replay_trace
from common.client import FastSwitchClient
from common.latency import percentile
from services.launch import LocalStack, StackConfig
from services.scheduler.core.config import Mode
from services.scheduler.core.inversion import QUEUED
from services.scheduler.core.policy import (
    FCFS,
    FairnessPolicy,
    PriorityPolicy,
    VirtualTokenCounter,
)
from services.scheduler.core.request import Request


@dataclass
class Ledger(FairnessPolicy):
    """Wraps a policy and records what it is told; `priorities` sets each client's priority
    when its request arrives. Service is weighed as VTC weighs it."""

    inner: FairnessPolicy
    clients: Sequence[str]
    priorities: dict[str, int] = field(default_factory=dict)
    input_weight: float = 1.0
    output_weight: float = 2.0
    requests: dict[str, Request] = field(default_factory=dict)
    charged_prompt: dict[str, int] = field(default_factory=dict)
    charged_output: dict[str, int] = field(default_factory=dict)
    service: dict[str, float] = field(default_factory=dict)
    window: list[tuple[float, ...]] = field(default_factory=list)  # while all are backlogged
    window_open: bool = True

    def __post_init__(self) -> None:
        self.preemptive = self.inner.preemptive
        self.service = dict.fromkeys(self.clients, 0.0)

    def rank(self, request: Request) -> tuple:
        return self.inner.rank(request)

    def on_arrival(self, request: Request, backlogged: Iterable[Request]) -> None:
        request.priority = self.priorities.get(request.client_id, request.priority)
        self.requests[request.request_id] = request
        self.inner.on_arrival(request, backlogged)

    def on_served(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        self.inner.on_served(request, prompt_tokens, output_tokens)
        rid = request.request_id
        self.charged_prompt[rid] = self.charged_prompt.get(rid, 0) + prompt_tokens
        self.charged_output[rid] = self.charged_output.get(rid, 0) + output_tokens
        self.service[request.client_id] += (
            self.input_weight * prompt_tokens + self.output_weight * output_tokens
        )
        if self.window_open:
            backlogged = {r.client_id for r in self.requests.values() if r.state in QUEUED}
            self.window_open = backlogged.issuperset(self.clients)
            if self.window_open:
                self.window.append(tuple(self.service[c] for c in self.clients))

    def double_charged_tokens(self) -> int:
        """Tokens charged beyond the request's prompt and its outputs."""
        return sum(
            max(0, self.charged_prompt.get(rid, 0) - len(r.prompt))
            + max(0, self.charged_output.get(rid, 0) - len(r.output))
            for rid, r in self.requests.items()
        )


def _single_turns(specs: Iterable[tuple[int, float, int, int]]) -> list[TurnSpec]:
    """(client, arrival_s, prompt, output) per request, each its own conversation."""
    return [TurnSpec(i, 0, at, prompt, output, client, 0)
            for i, (client, at, prompt, output) in enumerate(specs)]


def vtc_workload(num_clients: int, per_client: int) -> list[TurnSpec]:
    """Everyone arrives at once; client k's requests are k+1 times as long as client 0's."""
    return _single_turns((k, 0.0, 48 * (k + 1), 24 * (k + 1))
                         for _ in range(per_client) for k in range(num_clients))


def priority_workload(low: int, high: int) -> list[TurnSpec]:
    """`low` long requests of client 0 fill the batch; `high` short ones of client 1 follow."""
    return _single_turns([*((0, 0.0, 128, 256) for _ in range(low)),
                          *((1, 0.5, 32, 32) for _ in range(high))])


@dataclass(frozen=True)
class Setup:
    deployment: Deployment
    device_blocks: int
    modes: Sequence[Mode]
    num_clients: int = 4
    per_client: int = 32
    stack_per_client: int = 6


def vtc_report(setup: Setup, mode: Mode, policy: str) -> dict[str, Any]:
    turns = vtc_workload(setup.num_clients, setup.per_client)
    clients = [f"client-{k}" for k in range(setup.num_clients)]
    inner = VirtualTokenCounter() if policy == "vtc" else FCFS()
    ledger = Ledger(inner, clients)
    options = SimOptions(policy=policy, update_every=None, device_blocks=setup.device_blocks)
    result = simulate(setup.deployment, mode, turns, options, policy=ledger)
    longest_prompt = max(t.prompt_tokens for t in turns)
    capacity = setup.device_blocks * setup.deployment.block_size
    bound = 2 * max(ledger.input_weight * longest_prompt, ledger.output_weight * capacity)
    window = [b - a for a, b in zip(ledger.window[0], ledger.window[-1], strict=True)] \
        if ledger.window else []
    return {
        "max_gap": largest_gap(ledger.window),
        "bound_2u": bound,
        "within_bound": largest_gap(ledger.window) <= bound,
        "jain_index": jain(window) if window else None,
        "window_samples": len(ledger.window),
        "service_in_window": dict(zip(clients, window, strict=True)) if window else {},
        "double_charged_tokens": ledger.double_charged_tokens(),
        "preempted_by_recompute": result.stats.preempted_by_recompute,
        "preempted_by_swap": result.stats.preempted_by_swap,
    }


def priority_report(setup: Setup, mode: Mode, policy: str = "priority") -> dict[str, Any]:
    """`policy` "fcfs" is the contrast: it ignores priorities, so inversions must show."""
    deployment = replace(setup.deployment, max_num_seqs=4)
    turns = priority_workload(low=8, high=4)
    inner = PriorityPolicy() if policy == "priority" else FCFS()
    ledger = Ledger(inner, ["client-0", "client-1"], priorities={"client-0": 0, "client-1": 3})
    options = SimOptions(policy=policy, update_every=None)
    result = simulate(deployment, mode, turns, options, policy=ledger)
    high = [result.report.times[r.request_id].ttft for r in result.report.finished
            if r.client_id == "client-1"]
    return {
        "max_num_seqs": deployment.max_num_seqs,
        "inversions": result.fairness.inversions,
        "high_priority_p95_ttft_s": percentile([t for t in high if t is not None], 95),
        "double_charged_tokens": ledger.double_charged_tokens(),
        "preempted_by_recompute": result.stats.preempted_by_recompute,
        "preempted_by_swap": result.stats.preempted_by_swap,
    }


async def stack_vtc_report(setup: Setup, mode: Mode, gpu_blocks: int) -> dict[str, Any]:
    """Part 1 through the real CPU stack, as `benchmarks.stack` reports it (per token, from
    the clients' timestamps: `stack_fairness`)."""
    turns = vtc_workload(setup.num_clients, setup.stack_per_client)
    with tempfile.TemporaryDirectory(prefix="fastswitch-fairness-") as log_dir:
        config = StackConfig(mode=mode.value, policy="vtc", num_gpu_blocks=gpu_blocks,
                             log_dir=log_dir)
        with LocalStack(config) as stack:
            assert stack.describe is not None
            report = await replay_trace(stack.scheduler_address, turns, seed=0,
                                        vocab=stack.describe.vocab_size, time_scale=0.0)
            async with FastSwitchClient(stack.scheduler_address) as client:
                stats = await client.stats()
    figures = stack_fairness(report, gpu_blocks * config.block_size,
                             stats.priority_inversions, stats.priority_inversion_s)
    return {key: figures[f"vtc_{key}"] for key in ("max_gap", "bound_2u", "within_bound")} \
        | {"jain_index": figures["jain_index"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    setup = Setup(Deployment(A10, LLAMA3_8B), args.device_blocks, args.modes,
                  args.clients, args.per_client, args.stack_per_client)
    points: dict[str, Any] = {}
    for mode in setup.modes:
        points[mode.value] = {
            "vtc": vtc_report(setup, mode, "vtc"),
            "fcfs_contrast": vtc_report(setup, mode, "fcfs"),
            "priority": priority_report(setup, mode),
            "priority_fcfs_contrast": priority_report(setup, mode, "fcfs"),
        }
        if args.stack:
            points[mode.value]["stack_vtc"] = asyncio.run(
                stack_vtc_report(setup, mode, args.stack_gpu_blocks))
        print(f"[{mode.value}] {json.dumps(points[mode.value]['vtc'])}", file=sys.stderr)
    return {"config": {k: (v if k != "modes" else [m.value for m in v])
                       for k, v in vars(args).items() if k != "json"},
            "points": [{"setting": "a10/llama-3-8b", "modes": points}]}


def print_table(doc: dict[str, Any]) -> None:
    print(f"{'mode':<12} {'VTC gap':>9} {'2U':>9} {'Jain':>6} {'FCFS Jain':>9} "
          f"{'inversions':>10} {'charged twice':>13}")
    def index(jain: float | None) -> str:  # None: no instant had every client backlogged
        return "-" if jain is None else f"{jain:.3f}"

    for mode, p in doc["points"][0]["modes"].items():
        twice = sum(p[k]["double_charged_tokens"] for k in ("vtc", "priority"))
        print(f"{mode:<12} {p['vtc']['max_gap']:>9.0f} {p['vtc']['bound_2u']:>9.0f} "
              f"{index(p['vtc']['jain_index']):>6} {index(p['fcfs_contrast']['jain_index']):>9} "
              f"{p['priority']['inversions']:>10} {twice:>13}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", type=parse_modes, default=list(Mode),
                        help="comma list of scheduler modes (default: all)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-client", type=int, default=32, help="requests per client")
    parser.add_argument("--device-blocks", type=int, default=96,
                        help="simulated device KV blocks: small, so clients stay backlogged")
    parser.add_argument("--stack", action="store_true", help="run part 1 on the real stack too")
    parser.add_argument("--stack-gpu-blocks", type=int, default=64)
    parser.add_argument("--stack-per-client", type=int, default=6)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    doc = run(args)
    print_table(doc)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
