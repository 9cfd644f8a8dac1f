"""The scheduler's settings. Modes share every line of scheduling code: a mode is only a
named set of `Switches`, one per FastSwitch mechanism, so each can be ablated alone."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import Enum

from common.kv.allocator import BlockAllocator
from common.kv.group_allocator import BlockGroupAllocator, GroupSizing
from common.kv.single_block_allocator import SingleBlockAllocator


@dataclass(frozen=True)
class Switches:
    block_groups: bool = True  # contiguous block groups, and copies merged into runs
    async_swaps: bool = True  # each request waits for its own copy, not a global barrier
    host_reuse: bool = True  # host KV kept per conversation: copy only what the host lacks
    turn_offload: bool = True  # a finished turn's KV goes to the host for the next turn
    swap_preemption: bool = True  # preempt by swapping out; off: recompute (vLLM v1)
    device_cache: bool = True  # finished and recomputed KV stays on the device, evictable
    # Each block goes to the host once it is full, in the background (vLLM v1's offload):
    # a later swap-out then copies only the tail. On for fastswitch too: measured, it cut
    # P95 TTFT by 17-20% in `paper_sim --quick`; on the paper's load its effect is mixed
    # (the README's ablations).
    eager_offload: bool = True
    # Stores only the prompt's blocks, eagerly and at a turn's end: vLLM v1's
    # OffloadingConnector default (`offload_prompt_only`, vllm#43797). Decode KV stays on the
    # device, or is recomputed.
    offload_prompt_only: bool = False
    # A preempted request's stores in flight finish before the next step runs (vLLM v1's
    # worker blocks on them before the blocks are reused, vllm#29870).
    wait_stores_on_preempt: bool = False

    def __post_init__(self) -> None:
        for needs in ("turn_offload", "eager_offload"):
            if getattr(self, needs) and not self.host_reuse:
                raise ValueError(f"{needs} needs host_reuse: nothing could reuse the KV")

    def with_spec(self, spec: str) -> Switches:
        """These switches changed by `spec`, e.g. "-turn_offload,+async_swaps"."""
        names = {f.name for f in fields(self)}
        changes: dict[str, bool] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            on, name = item[0] != "-", item.lstrip("+-")
            if name not in names:
                raise ValueError(f"unknown switch {name!r}; switches are {sorted(names)}")
            changes[name] = on
        if not changes.get("host_reuse", True):
            changes.setdefault("turn_offload", False)
            changes.setdefault("eager_offload", False)
        return replace(self, **changes)

    def describe(self) -> str:
        return ",".join(("+" if getattr(self, f.name) else "-") + f.name for f in fields(self))


class Mode(Enum):
    FASTSWITCH = "fastswitch"  # every mechanism: FastSwitch's, a device prefix cache, eager offload
    BASELINE = "baseline"  # vLLM 0.3: single blocks, swaps behind a global barrier, no reuse
    # vLLM v1 as shipped, with prefix caching and the OffloadingConnector (see
    # benchmarks/sim/VLLM_V1.md): preemption only when a running request cannot grow, by
    # recompute; a device prefix cache; each full prompt block stored to the host as it
    # fills, one copy per block; a preempted request's stores waited for; whole loads.
    VLLM_V1 = "vllm-v1"
    VLLM_V1_OFFLOAD_ALL = "vllm-v1-offload-all"  # the same, decode blocks stored too

    @property
    def switches(self) -> Switches:
        if self is Mode.FASTSWITCH:
            return Switches()
        if self in VLLM_V1_MODES:
            return Switches(block_groups=False, swap_preemption=False, turn_offload=False,
                            offload_prompt_only=self is Mode.VLLM_V1,
                            wait_stores_on_preempt=True)
        return Switches(block_groups=False, async_swaps=False, host_reuse=False,
                        turn_offload=False, device_cache=False, eager_offload=False)

    @property
    def preemption(self) -> str:
        """The mode's own preemption policy: a `preemption.PREEMPTION_POLICIES` name."""
        if self in VLLM_V1_MODES:
            return "on-allocation-failure"
        return "on-order-change"


VLLM_V1_MODES = frozenset({Mode.VLLM_V1, Mode.VLLM_V1_OFFLOAD_ALL})


@dataclass(frozen=True)
class SchedulerConfig:
    mode: Mode = Mode.FASTSWITCH
    block_size: int = 16
    num_device_blocks: int = 1024
    max_num_seqs: int = 32
    max_batched_tokens: int = 512
    max_waiting: int | None = None  # requests that may wait to be admitted; None: no limit
    group_sizing: GroupSizing = field(default_factory=GroupSizing)
    switches: Switches | None = None  # None: the mode's own

    def __post_init__(self) -> None:
        for name in ("block_size", "num_device_blocks", "max_num_seqs", "max_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must not be negative, got {self.max_waiting}")
        if self.switches is None:
            object.__setattr__(self, "switches", self.mode.switches)

    @property
    def on(self) -> Switches:
        assert self.switches is not None
        return self.switches

    def make_allocator(self) -> BlockAllocator:
        if self.on.block_groups:
            return BlockGroupAllocator(self.num_device_blocks, self.group_sizing)
        return SingleBlockAllocator(self.num_device_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
