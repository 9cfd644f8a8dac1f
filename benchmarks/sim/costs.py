"""The simulator's `CostModel`: the planner's plans priced by the roofline and the link model.

A step costs what `StepCostModel` says for its batch, each scheduled sequence contributing
(context = `start`, new tokens = `len(token_ids)`). A swap costs its copies back to back on
the link, and the mode decides what a copy is: the baseline's layer-major cache turns every
block into `2 * layers` small copies, FastSwitch's block-major cache moves one extent in one
copy, and vLLM v1's block-major offload moves one block per copy. Queueing and overlap are
the `VirtualDriver`'s business, not this module's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from benchmarks.sim.copy_engine import KvLayout, LinkModel, Transfer, extent_transfer
from benchmarks.sim.cost_model import StepCostModel
from services.scheduler.core.config import Mode
from services.scheduler.core.plan import StepPlan, SwapOrder

LAYOUT_OF: dict[Mode, KvLayout] = {
    Mode.BASELINE: KvLayout.LAYER_MAJOR,
    Mode.FASTSWITCH: KvLayout.BLOCK_MAJOR,
    # vLLM v1's CPU offload copies each block contiguous across layers (PR #27743), one
    # copy per block: block-major, without FastSwitch's runs of blocks.
    Mode.VLLM_V1: KvLayout.BLOCK_MAJOR,
    Mode.VLLM_V1_OFFLOAD_ALL: KvLayout.BLOCK_MAJOR,
}

# A sweep prices millions of copies of a few distinct lengths.
_extent_transfer = lru_cache(maxsize=4096)(extent_transfer)


@dataclass(frozen=True)
class SimCost:
    step_model: StepCostModel
    link: LinkModel
    layout: KvLayout

    @classmethod
    def for_mode(cls, step_model: StepCostModel, link: LinkModel, mode: Mode) -> SimCost:
        return cls(step_model, link, LAYOUT_OF[mode])

    def step_seconds(self, plan: StepPlan) -> float:
        return self.step_model.step_time_s([(s.start, s.num_tokens) for s in plan.batch])

    def transfers(self, order: SwapOrder) -> list[Transfer]:
        """The physical copies behind one swap order, in this cost model's layout."""
        deployment = self.step_model.deployment
        return [
            _extent_transfer(deployment.model, deployment.block_size, self.layout, c.num_blocks)
            for c in order.copies
        ]

    def swap_seconds(self, order: SwapOrder) -> float:
        return sum(self.link.transfer_time_s(t) for t in self.transfers(order))
