"""The executor's Prometheus metrics, all named `fastswitch_executor_*`.

Step time here is the forward pass and sampling alone (the scheduler's step histogram adds
the RPC around it); swap time is the copy itself, from the copy engine's own clock.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics import BYTES_BUCKETS, NAMESPACE, SECONDS_BUCKETS, RpcErrors
from services.executor.copy import CompletionStream
from services.executor.engine import ExecutorEngine, SwapDone

SUBSYSTEM = "executor"


class ExecutorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        common = {"namespace": NAMESPACE, "subsystem": SUBSYSTEM, "registry": self.registry}
        self.step = Histogram("step_seconds", "Forward pass and sampling of one step",
                              buckets=SECONDS_BUCKETS, **common)
        self.step_sequences = Histogram("step_sequences", "Sequences in one step",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), **common)
        self.swap_latency = Histogram("swap_seconds", "Copy time of one swap", ("direction",),
                                      buckets=SECONDS_BUCKETS, **common)
        self.swap_bytes = Histogram("swap_bytes", "Bytes copied by one swap", ("direction",),
                                    buckets=BYTES_BUCKETS, **common)
        self.swap_failures = Counter("swap_failures", "Swaps that ended with an error",
                                     ("direction",), **common)
        self.swaps_in_flight = Gauge("swaps_in_flight", "Swaps submitted and not yet done",
                                     **common)
        self.device_blocks = Gauge("device_blocks", "Blocks of the device KV cache", **common)
        self.host_blocks = Gauge("host_blocks", "Blocks of the attached host arena", **common)
        self.rpc_errors = RpcErrors(SUBSYSTEM, self.registry)

    def watch(self, engine: ExecutorEngine) -> None:
        self.device_blocks.set(engine.geometry.num_blocks)
        self.host_blocks.set_function(lambda: engine.describe().num_host_blocks)

    async def record_swaps(self, completions: CompletionStream) -> None:
        """Observes every swap completion until the stream closes."""
        async for done in completions:
            swap: SwapDone = done  # type: ignore[assignment]  # the engine's hub relays SwapDone
            self.swaps_in_flight.dec()
            if swap.error:
                self.swap_failures.labels(swap.direction).inc()
            else:
                self.swap_latency.labels(swap.direction).observe(swap.duration_s)
                self.swap_bytes.labels(swap.direction).observe(swap.bytes)
