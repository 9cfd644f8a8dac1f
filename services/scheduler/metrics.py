"""The scheduler's Prometheus metrics, all named `fastswitch_scheduler_*`.

Latencies are observed by the engine as they happen: TTFT and TBT per sampled token, the
step round trip, and each swap from submission to its completion event. Block and queue
gauges and the planner's counters are read from the same snapshot as the Stats RPC, at
scrape time, and so are the per-tenant numbers (`fastswitch_scheduler_tenant_*`, labelled
`tenant`; "" is every caller together on a scheduler without API keys).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from common.metrics import (
    BYTES_BUCKETS,
    NAMESPACE,
    SECONDS_BUCKETS,
    RpcErrors,
    ScrapeTimeCollector,
)
from protos import scheduler_pb2 as pb
from services.scheduler.tenants import TenantRow

SUBSYSTEM = "scheduler"
PREFIX = f"{NAMESPACE}_{SUBSYSTEM}_"


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

        def histogram(name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()
                      ) -> Histogram:
            return Histogram(name, doc, labels, namespace=NAMESPACE, subsystem=SUBSYSTEM,
                             buckets=buckets, registry=self.registry)

        self.ttft = histogram("ttft_seconds", "Arrival to first token", SECONDS_BUCKETS)
        self.tbt = histogram("tbt_seconds", "Time between consecutive tokens of a request",
                             SECONDS_BUCKETS)
        self.step = histogram("step_seconds", "Round trip of one executor Step",
                              SECONDS_BUCKETS)
        self.swap_latency = histogram("swap_seconds", "Swap submission to its completion event",
                                      SECONDS_BUCKETS, ("direction",))
        self.swap_bytes = histogram("swap_bytes", "Bytes moved by one swap", BYTES_BUCKETS,
                                    ("direction",))
        self.rpc_errors = RpcErrors(SUBSYSTEM, self.registry)

    def observe_token(self, timings: Sequence[float]) -> None:
        """`timings`: the request's arrival, then the time of each token so far."""
        if len(timings) == 2:
            self.ttft.observe(timings[1] - timings[0])
        elif len(timings) > 2:
            self.tbt.observe(timings[-1] - timings[-2])

    def observe_swap(self, direction: str, seconds: float, nbytes: int) -> None:
        self.swap_latency.labels(direction).observe(seconds)
        self.swap_bytes.labels(direction).observe(nbytes)

    def watch(self, read_stats: Callable[[], Coroutine[Any, Any, pb.StatsResponse]],
              read_tenants: Callable[[], Coroutine[Any, Any, list[TenantRow]]]) -> None:
        """Exports the Stats snapshot and the tenants' numbers at each scrape; call it on
        the serving loop."""
        loop = asyncio.get_running_loop()
        self.registry.register(ScrapeTimeCollector(loop, read_stats, stats_families))
        self.registry.register(ScrapeTimeCollector(loop, read_tenants, tenant_families))


def tenant_families(rows: list[TenantRow]) -> Iterator[Metric]:
    queued = GaugeMetricFamily(PREFIX + "tenant_queued",
                               "Requests admitted and not running (waiting or preempted)",
                               labels=["tenant"])
    running = GaugeMetricFamily(PREFIX + "tenant_running", "Requests running",
                                labels=["tenant"])
    tokens = CounterMetricFamily(PREFIX + "tenant_tokens", "Tokens served",
                                 labels=["tenant"])
    refusals = CounterMetricFamily(PREFIX + "tenant_refusals",
                                   "Requests refused by a limit, by the limit's name",
                                   labels=["tenant", "limit"])
    for row in rows:
        queued.add_metric([row.tenant], row.queued)
        running.add_metric([row.tenant], row.running)
        tokens.add_metric([row.tenant], row.tokens)
        for limit, n in sorted(row.refusals.items()):
            refusals.add_metric([row.tenant, limit], n)
    yield from (queued, running, tokens, refusals)


def stats_families(s: pb.StatsResponse) -> Iterator[Metric]:
    blocks = GaugeMetricFamily(
        PREFIX + "blocks",
        "KV blocks by state: free, used, cached (the device prefix cache, evictable) and "
        "draining device blocks, and the host blocks that swapped-out requests hold",
        labels=["state"],
    )
    for state, value in (("free", s.free_blocks), ("used", s.running_blocks),
                         ("cached", s.cached_blocks), ("draining", s.draining_blocks),
                         ("swapped", s.swapped_blocks)):
        blocks.add_metric([state], value)
    requests = GaugeMetricFamily(PREFIX + "requests", "Requests by queue", labels=["queue"])
    for queue, value in (("waiting", s.waiting), ("running", s.running),
                         ("swapped", s.swapped)):
        requests.add_metric([queue], value)
    yield blocks
    yield requests
    yield GaugeMetricFamily(PREFIX + "swaps_in_flight", "Swaps submitted and not yet done",
                            value=s.swaps_in_flight)
    yield GaugeMetricFamily(PREFIX + "executor_available",
                            "1 while the executor answers, 0 while it is being waited for",
                            value=int(s.executor_available))
    stores = GaugeMetricFamily(PREFIX + "kvstores", "KV store instances in use, by state",
                               labels=["state"])
    stores.add_metric(["up"], s.kvstores - s.kvstores_down)
    stores.add_metric(["down"], s.kvstores_down)
    yield stores
    yield GaugeMetricFamily(PREFIX + "kvstore_degraded",
                            "1 while KV store calls fail and preemption falls back to recompute",
                            value=int(s.kvstore_degraded))
    yield CounterMetricFamily(PREFIX + "kvstore_degraded_seconds",
                              "Seconds the KV store tier was degraded (kvstore_degraded 1)",
                              value=s.kvstore_degraded_seconds)
    yield CounterMetricFamily(PREFIX + "preemptions", "Requests preempted (swap or recompute)",
                              value=s.preemptions)
    yield CounterMetricFamily(PREFIX + "reuse_hit_tokens",
                              "Tokens whose KV the host already held: not copied or prefilled",
                              value=s.reuse_hit_tokens)
    yield CounterMetricFamily(PREFIX + "finished_requests", "Requests finished",
                              value=s.finished)
    yield CounterMetricFamily(PREFIX + "steps", "Executor steps run", value=s.steps)
    yield CounterMetricFamily(PREFIX + "swap_copies", "Copies submitted (one per extent)",
                              value=s.copies)
    yield CounterMetricFamily(PREFIX + "wasted_tokens",
                              "Tokens computed for a request that had finished the step before "
                              "(the cost of lookahead)", value=s.wasted_tokens)
    yield CounterMetricFamily(PREFIX + "priority_inversions",
                              "Steps run while a request of higher priority than one in the "
                              "batch waited for the device", value=s.priority_inversions)
    yield CounterMetricFamily(PREFIX + "priority_inversion_seconds",
                              "Time spent in those steps", value=s.priority_inversion_s)
