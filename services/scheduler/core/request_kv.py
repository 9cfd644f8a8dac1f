"""One request's KV bookkeeping beyond its device blocks (which the allocator's table holds)
and its state (which says whether a host reply is awaited): where its host copy lives,
what the host holds pinned for it, and what its eager offload has stored. The planner
creates one per request on arrival and drops it in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from common.kv.block_hash import TokenChain
from common.kv.reuse_index import PinHandle


class Purpose(Enum):
    """Why KV moves between device and host: what a host ask is for, and so what the swap
    that follows its reply does."""

    PREEMPT = "preempt"  # a preempted request's KV goes out; its device blocks are freed
    OFFLOAD = "offload"  # a finished turn's KV goes out for the next turn
    STORE = "store"  # a running request's newly full blocks go out; it keeps them (eager)
    RESUME = "resume"  # a swapped-out request's own KV comes back
    PREFIX = "prefix"  # a new turn's conversation prefix comes in

    @property
    def pins(self) -> bool:
        """Its host ask is a `Pin` (KV comes in), not a `Reserve` (KV goes out)."""
        return self in (Purpose.RESUME, Purpose.PREFIX)


@dataclass(slots=True, eq=False)
class RequestKV:
    host_key: str  # the host's name for this KV: the conversation, or a private swap key
    private: bool  # the host copy is this request's alone, and is released with it
    chain: TokenChain
    host_tokens: int = 0  # while SWAPPED: leading tokens of KV that `pin` holds on the host
    pin: PinHandle | None = None  # host blocks held for a swap-in, until it is done
    pinned_for: Purpose = Purpose.RESUME  # what `pin` holds: its own KV, or a prefix
    stored_blocks: int = 0  # eager offload: leading full blocks the host holds
    storing: int = 0  # eager offload: full blocks that a store under way will make it hold
    offload_after_store: bool = False  # finished while storing: offload once that ends

    def hashes(self, tokens: Sequence[int]) -> tuple[bytes, ...]:
        return tuple(self.chain.hashes(tokens))
