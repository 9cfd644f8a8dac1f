"""What each tenant holds and has used: the numbers behind the per-tenant limits and the
per-tenant metrics.

A tenant is the caller's `Principal.tenant`: "" stands for every caller together when the
scheduler has no API keys. The engine counts the tokens it serves; the service counts
refusals, by the limit that refused (`max_queued`, `max_conversations`, `max_priority`,
and the scheduler-wide `max_waiting`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class TenantUsage:
    tokens: Counter[str] = field(default_factory=Counter)  # tokens served, by tenant
    refusals: Counter[tuple[str, str]] = field(default_factory=Counter)  # (tenant, limit)

    def refused(self, tenant: str, limit: str) -> None:
        self.refusals[tenant, limit] += 1


@dataclass(frozen=True, slots=True)
class TenantRow:
    """One tenant's numbers at one moment."""

    tenant: str
    queued: int  # admitted, not running: waiting, or preempted
    running: int
    tokens: int
    refusals: dict[str, int]  # by limit
