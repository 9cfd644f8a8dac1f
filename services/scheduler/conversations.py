"""The Chat conversations the scheduler remembers between turns, bounded per tenant.

Each tenant (one bucket for everyone when no API keys are configured) holds at most
`max_per_tenant` conversations, and a conversation idle for `ttl_s` is forgotten. A turn in
flight keeps its conversation alive. When a tenant starts one conversation too many, its
least recently used idle one is evicted; when all of them have turns in flight the new
one is refused. The caller releases the host KV of what `open` and `expire` return.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from services.scheduler.prompts import Conversation


@dataclass(frozen=True, slots=True)
class ConversationLimits:
    ttl_s: float = 3600.0  # idle seconds before a conversation is forgotten; 0: never
    max_per_tenant: int = 1000  # 0: no cap

    def __post_init__(self) -> None:
        if self.ttl_s < 0 or self.max_per_tenant < 0:
            raise ValueError(f"conversation limits must not be negative: {self}")


@dataclass(eq=False, slots=True)
class Entry:
    key: str  # scoped: unique across tenants
    owner: str
    used: float
    conversation: Conversation = field(default_factory=Conversation)
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def idle(self) -> bool:
        return not self.turn.locked()


class TooManyConversations(Exception):
    pass


class Conversations:
    def __init__(self, limits: ConversationLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or ConversationLimits()
        self._clock = clock
        self._by_owner: dict[str, OrderedDict[str, Entry]] = {}  # least recently used first

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_owner.values())

    def count(self, owner: str) -> int:
        return len(self._by_owner.get(owner, ()))

    def get(self, owner: str, key: str) -> Entry | None:
        return self._by_owner.get(owner, {}).get(key)

    def open(self, owner: str, key: str, cap: int | None = None) -> tuple[Entry, list[str]]:
        """The conversation `key` of `owner`, new if unknown, marked used; and the keys
        that were evicted to make room (their host KV is the caller's to release). `cap`:
        this owner's own limit, instead of `limits.max_per_tenant` (0: no cap)."""
        entries = self._by_owner.setdefault(owner, OrderedDict())
        entry = entries.get(key)
        now = self._clock()
        if entry is not None:
            entry.used = now
            entries.move_to_end(key)
            return entry, []
        evicted: list[str] = []
        cap = self.limits.max_per_tenant if cap is None else cap
        if cap and len(entries) >= cap:
            victim = next((e for e in entries.values() if e.idle), None)
            if victim is None:
                raise TooManyConversations(
                    f"{len(entries)} conversations have turns in flight (limit "
                    f"max_conversations={cap})")
            del entries[victim.key]
            evicted.append(victim.key)
        entry = entries[key] = Entry(key, owner, now)
        return entry, evicted

    def touch(self, entry: Entry) -> None:
        entry.used = self._clock()
        entries = self._by_owner.get(entry.owner)
        if entries is not None and entries.get(entry.key) is entry:
            entries.move_to_end(entry.key)

    def forget(self, entry: Entry) -> None:
        """Drops `entry` (if it is still the one held under its key)."""
        entries = self._by_owner.get(entry.owner)
        if entries is not None and entries.get(entry.key) is entry:
            del entries[entry.key]
            if not entries:
                del self._by_owner[entry.owner]

    def expire(self) -> list[str]:
        """Forgets the conversations idle for longer than the TTL; returns their keys."""
        if not self.limits.ttl_s:
            return []
        cutoff = self._clock() - self.limits.ttl_s
        expired: list[str] = []
        for owner in list(self._by_owner):
            entries = self._by_owner[owner]
            old = []
            for entry in entries.values():  # least recently used first
                if entry.used > cutoff:
                    break
                if entry.idle:  # a turn that began long ago may still run
                    old.append(entry.key)
            for key in old:
                del entries[key]
            expired += old
            if not entries:
                del self._by_owner[owner]
        return expired
