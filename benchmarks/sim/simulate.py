"""One simulated run: a workload through the real planner in one mode on one deployment.

The planner, allocators, reuse index and policies are the scheduler core's own; only the
executor and the copy engine are replaced, by `SimCost` on the `VirtualDriver`'s clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from benchmarks.sim.checked_executor import CheckedExecutor
from benchmarks.sim.copy_engine import LinkModel
from benchmarks.sim.cost_model import StepCostModel
from benchmarks.sim.costs import SimCost
from benchmarks.sim.fairness_stats import FairnessStats
from benchmarks.sim.hardware import Deployment
from benchmarks.sim.replay import Replay, request_id
from benchmarks.sim.virtual_driver import HostCosts, RunReport, VirtualDriver
from benchmarks.sim.workload import TurnSpec
from common.kv.reuse_index import ReuseIndex
from services.scheduler.core.config import Mode, SchedulerConfig
from services.scheduler.core.plan import Direction, StepPlan
from services.scheduler.core.planner import Planner, PlannerStats
from services.scheduler.core.policy import POLICIES, FairnessPolicy, RandomPriorityUpdates
from services.scheduler.core.preemption import PREEMPTION_POLICIES

SWITCH_COSTS = ("real", "zero")
FREE_LINK = LinkModel(0.0, float("inf"))


class ConservationError(AssertionError):
    """A run broke an invariant every correct schedule keeps."""


@dataclass(frozen=True)
class SimOptions:
    policy: str = "priority"
    update_every: int | None = 50
    """Iterations between priority reshuffles (priority policy only); None: never."""
    priority_levels: int = 4
    host_kv_multiple: float = 4.0
    """Host KV blocks as a multiple of the device's (both modes get the same host)."""
    device_blocks: int | None = None
    """Overrides the deployment's device KV blocks, e.g. to force pressure in tests."""
    link: LinkModel = field(default_factory=LinkModel)
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.85
    step_overhead_s: float = 4e-3
    seed: int = 0
    vocab: int = 32000
    switches: str = ""
    """Changes to each mode's switches, e.g. "-turn_offload" (see `Switches.with_spec`):
    an ablation."""
    host_costs: HostCosts = field(default_factory=HostCosts)
    """The scheduler's own costs: a KV store round trip per plan, and planning time."""
    preemption: str = ""
    """A `PREEMPTION_POLICIES` name; empty: the mode's own (`Mode.preemption`)."""
    switch_cost: str = "real"
    """"zero": the limit, free copies, store round trips and planning (`SWITCH_COSTS`)."""
    lookahead: bool = True
    """Plan step N+1 while step N runs, as the real driver does: planning is charged only
    where it outlasts the step (`VirtualDriver`)."""
    history_known: bool = True
    """Requests say how much of their prompt is history (`Replay.history_known`)."""

    def __post_init__(self) -> None:
        if self.switch_cost not in SWITCH_COSTS:
            raise ValueError(f"switch_cost must be one of {SWITCH_COSTS}, got {self.switch_cost!r}")
        if self.preemption and self.preemption not in PREEMPTION_POLICIES:
            raise ValueError(f"preemption must be one of {sorted(PREEMPTION_POLICIES)}, "
                             f"got {self.preemption!r}")


@dataclass
class SwapTally:
    """The physical copies the cost model charged, per direction. Swap-outs are either
    preemptions or (FastSwitch) a finished turn's KV kept for the next turn."""

    copies: int = 0
    bytes_out: int = 0
    bytes_out_preempted: int = 0
    bytes_in: int = 0

    def add(self, cost: SimCost, plan: StepPlan) -> None:
        preempted = {p.request_id for p in plan.preemptions}
        for order in plan.swaps:
            transfers = cost.transfers(order)
            self.copies += sum(t.num_copies for t in transfers)
            moved = sum(t.total_bytes for t in transfers)
            if order.direction is Direction.IN:
                self.bytes_in += moved
                continue
            self.bytes_out += moved
            if order.request_id in preempted:
                self.bytes_out_preempted += moved


@dataclass
class ModeResult:
    mode: Mode
    deployment: Deployment
    num_device_blocks: int
    report: RunReport
    stats: PlannerStats
    swaps: SwapTally
    num_turns: int
    fairness: FairnessStats


def simulate(
    deployment: Deployment,
    mode: Mode,
    turns: Sequence[TurnSpec],
    options: SimOptions,
    *,
    check_tokens: bool = False,
    policy: FairnessPolicy | None = None,
    cost: SimCost | None = None,
) -> ModeResult:
    """`check_tokens` runs the token-checking executor too: exact, and much slower. `policy`
    replaces a fresh `options.policy` (to observe what it is told); `cost` replaces the
    roofline and link models (e.g. a calibrated CPU one; at zero switch cost its link is free)."""
    device_blocks = options.device_blocks or deployment.num_gpu_blocks
    host_blocks = max(1, int(options.host_kv_multiple * device_blocks))
    _check_fits(deployment, device_blocks, turns)
    config = SchedulerConfig(
        mode=mode,
        block_size=deployment.block_size,
        num_device_blocks=device_blocks,
        max_num_seqs=deployment.max_num_seqs,
        max_batched_tokens=deployment.max_batched_tokens,
        switches=mode.switches.with_spec(options.switches),
    )
    host = ReuseIndex(
        fingerprint=deployment.model.name, block_size=deployment.block_size, num_blocks=host_blocks
    )
    planner = Planner(config, policy or POLICIES[options.policy](), host.fingerprint,
                      PREEMPTION_POLICIES[options.preemption or mode.preemption]())
    zero = options.switch_cost == "zero"
    link, host_costs = (FREE_LINK, HostCosts()) if zero else (options.link, options.host_costs)
    step_model = StepCostModel(
        deployment,
        compute_efficiency=options.compute_efficiency,
        memory_efficiency=options.memory_efficiency,
        step_overhead_s=options.step_overhead_s,
    )
    cost = replace(cost, link=link) if cost is not None else SimCost.for_mode(
        step_model, link, mode)
    tally, fairness = SwapTally(), FairnessStats()

    def observe(driver: VirtualDriver, plan: StepPlan) -> None:
        tally.add(cost, plan)
        fairness.observe(plan, driver.step_s, planner)

    replay = Replay(turns, options.seed, options.vocab, options.history_known)
    updates = (
        RandomPriorityUpdates(options.update_every, options.priority_levels, options.seed)
        if options.policy == "priority" and options.update_every
        else None
    )
    executor = (
        CheckedExecutor(deployment.block_size, device_blocks, host_blocks, vocab=options.vocab)
        if check_tokens
        else None
    )
    driver = VirtualDriver(
        planner,
        cost,
        host,
        host_costs=host_costs,
        executor=executor,
        priority_updates=updates,
        follow_up=replay.follow_up,
        on_iteration=observe,
        lookahead=options.lookahead,
    )
    for at, request in replay.first_turns():
        driver.submit(at, request)
    report = driver.run()
    result = ModeResult(mode, deployment, device_blocks, report, planner.stats, tally, len(turns),
                        fairness)
    check_conservation(result)
    return result


def _check_fits(deployment: Deployment, device_blocks: int, turns: Sequence[TurnSpec]) -> None:
    """A turn longer than the model's context or the device's KV could never be scheduled."""
    for t in turns:
        total = t.full_prompt_tokens + t.output_tokens
        blocks = -(-total // deployment.block_size)
        if total > deployment.model.max_context or blocks > device_blocks:
            raise ValueError(
                f"{request_id(t)} needs {total} tokens ({blocks} blocks): more than "
                f"{deployment.model.name}'s context of {deployment.model.max_context} or the "
                f"{device_blocks} device blocks"
            )


def check_conservation(result: ModeResult) -> None:
    """Every turn finishes, and nothing is swapped in that was never on the host: the blocks
    swapped in are at most those swapped out, plus those a swap-out found already there, plus
    the prompt prefixes found there for a new turn."""
    finished = len(result.report.finished)
    if finished != result.num_turns:
        raise ConservationError(f"{finished} of {result.num_turns} turns finished")
    s = result.stats
    block_size = result.deployment.block_size
    hit_blocks = -(-s.prefix_hit_tokens // block_size)
    if s.blocks_in > s.blocks_out + s.reuse_saved_blocks + hit_blocks:
        raise ConservationError(
            f"{s.blocks_in} blocks swapped in, but only {s.blocks_out} swapped out, "
            f"{s.reuse_saved_blocks} already on the host and {hit_blocks} prefix hits"
        )
    block_bytes = result.deployment.block_bytes
    if (result.swaps.bytes_out, result.swaps.bytes_in) != (
        s.blocks_out * block_bytes,
        s.blocks_in * block_bytes,
    ):
        raise ConservationError("the bytes charged differ from the blocks the planner moved")
