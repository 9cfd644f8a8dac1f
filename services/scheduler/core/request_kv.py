"""One request's KV bookkeeping beyond its device blocks (which the allocator's table holds):
where its host copy lives, what the host holds pinned for it, and which host reply it
waits for. The planner creates one per request on arrival and drops it in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.kv.block_hash import TokenChain
from common.kv.reuse_index import PinHandle


@dataclass(slots=True, eq=False)
class RequestKV:
    host_key: str  # the host's name for this KV: the conversation, or a private swap key
    private: bool  # the host copy is this request's alone, and is released with it
    chain: TokenChain
    host_tokens: int = 0  # while SWAPPED: leading tokens of KV that `pin` holds on the host
    pin: PinHandle | None = None  # host blocks held for a swap-in, until it is done
    awaiting: int | None = None  # the host op whose reply decides what this request does next
    asked: bool = False  # WAITING: the host was asked for a prefix and had none to give
    prefix_hit: bool = False  # the pin is a new turn's prefix, not this request's own KV
    stored_blocks: int = 0  # eager offload: leading full blocks the host holds
    storing: int = 0  # eager offload: full blocks that a store under way will make it hold
    offload_after_store: bool = False  # finished while storing: offload once that ends

    def hashes(self, tokens: Sequence[int]) -> tuple[bytes, ...]:
        return tuple(self.chain.hashes(tokens))
