"""The KV store's Prometheus metrics, all named `fastswitch_kvstore_*`.

Blocks, pending reservations and the store's own counters (reuse hits, evictions) come from
`KVStore.stats()`, read where store calls run, at scrape time; RPC errors are counted by
code as calls end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from common.metrics import NAMESPACE, RpcErrors, ScrapeTimeCollector
from services.kvstore.store import StoreStats

SUBSYSTEM = "kvstore"
PREFIX = f"{NAMESPACE}_{SUBSYSTEM}_"


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rpc_errors = RpcErrors(SUBSYSTEM, self.registry)

    def watch(self, read_stats: Callable[[], Coroutine[Any, Any, StoreStats]]) -> None:
        """Exports the store's stats at each scrape; call it on the serving loop."""
        self.registry.register(
            ScrapeTimeCollector(asyncio.get_running_loop(), read_stats, stats_families)
        )


def stats_families(s: StoreStats) -> Iterator[Metric]:
    blocks = GaugeMetricFamily(
        PREFIX + "blocks",
        "Host arena blocks by state (pinned blocks are also counted as used)",
        labels=["state"],
    )
    for state, value in (("free", s.capacity_blocks - s.used_blocks), ("used", s.used_blocks),
                         ("pinned", s.pinned_blocks)):
        blocks.add_metric([state], value)
    yield blocks
    yield GaugeMetricFamily(PREFIX + "capacity_blocks", "Blocks of the arena",
                            value=s.capacity_blocks)
    yield GaugeMetricFamily(PREFIX + "pending_reservations",
                            "Reservations made and not yet committed or aborted",
                            value=s.pending_reservations)
    yield CounterMetricFamily(PREFIX + "hit_tokens",
                              "Lookup and Reserve tokens whose KV the store already held",
                              value=s.hit_tokens)
    yield CounterMetricFamily(PREFIX + "miss_tokens",
                              "Lookup and Reserve tokens whose KV the store lacked",
                              value=s.miss_tokens)
    yield CounterMetricFamily(PREFIX + "evicted_blocks", "Blocks evicted to make room (LRU)",
                              value=s.evicted_blocks)
    yield CounterMetricFamily(PREFIX + "reuse_saved_bytes",
                              "Bytes a Reserve spared from being copied: the store held them",
                              value=s.bytes_saved_by_reuse)
