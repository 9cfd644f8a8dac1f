"""Prometheus metrics: errors by status code, scrape-time snapshots, and a scrape of all
three services while the stack serves requests with preemptions."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from common.client import FastSwitchClient
from common.kv.host_ops import Abort, Commit, Unpin
from common.metrics import ScrapeTimeCollector
from protos import kvstore_pb2, kvstore_pb2_grpc
from services.kvstore.service import StoreServer
from services.launch import LocalStack, StackConfig, free_port
from tests.support.stores import BatchCalls, Geometry, serve_store

pytestmark = pytest.mark.process

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def samples(text: str) -> Samples:
    """{(sample name, sorted labels): value} of an exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped[name, tuple(sorted(labels.items()))]


async def counted(scrape: Callable[[], Awaitable[Samples]], key: tuple[str, Labels]
                  ) -> Samples:
    """The samples once `key` is among them, or the last ones after 5 s: a refused call is
    counted once the server has finished it, which may be after the client saw its status."""
    for _ in range(100):
        scraped = await scrape()
        if key in scraped:
            break
        await asyncio.sleep(0.05)
    return scraped


async def scrape_registry(registry: CollectorRegistry) -> Samples:
    """Off the loop, as the HTTP server's thread scrapes."""
    return samples((await asyncio.to_thread(generate_latest, registry)).decode())


@pytest.fixture
async def store() -> AsyncIterator[tuple[StoreServer, kvstore_pb2_grpc.KVStoreStub]]:
    served = await serve_store(Geometry(num_blocks=8, block_bytes=4096, block_size=4,
                                        fingerprint="fp"),
                               f"fastswitch-metrics-{uuid.uuid4().hex[:8]}")
    async with served.channel:
        yield served.server, served.stub
    await served.stop()


async def test_store_counts_errors_by_code_and_exports_its_stats(
    store: tuple[StoreServer, kvstore_pb2_grpc.KVStoreStub],
) -> None:
    server, stub = store
    calls = BatchCalls(stub, "fp", 4)
    res = await calls.reserve("c", list(range(12)))  # 3 blocks
    await calls(Commit(res.reservation_id))
    pin = await calls.pin("c", list(range(12)))
    await calls(Unpin(pin.pin_id))
    pending = await calls.reserve("d", list(range(8)))  # left pending
    other = BatchCalls(stub, "fp", 4, "another-client")
    for _ in range(2):  # another client's abort: unary errors
        with pytest.raises(grpc.aio.AioRpcError):
            await other(Abort(pending.reservation_id))
    far = kvstore_pb2.ReadBlocksRequest(extents=[kvstore_pb2.Extent(start=7, length=4)])
    with pytest.raises(grpc.aio.AioRpcError):  # a server-streaming handler's error
        await stub.ReadBlocks(far).read()

    scraped = await counted(
        lambda: scrape_registry(server.metrics.registry),
        ("fastswitch_kvstore_rpc_errors_total",
         (("code", "INVALID_ARGUMENT"), ("method", "ReadBlocks"))),
    )
    errors = {labels: v for (name, labels), v in scraped.items()
              if name == "fastswitch_kvstore_rpc_errors_total"}
    assert errors == {
        (("code", "PERMISSION_DENIED"), ("method", "Batch")): 2.0,
        (("code", "INVALID_ARGUMENT"), ("method", "ReadBlocks")): 1.0,
    }
    assert value(scraped, "fastswitch_kvstore_blocks", state="used") == 5  # 3 + 2 reserved
    assert value(scraped, "fastswitch_kvstore_blocks", state="free") == 3
    assert value(scraped, "fastswitch_kvstore_pending_reservations") == 1
    assert value(scraped, "fastswitch_kvstore_hit_tokens_total") == 12
    assert value(scraped, "fastswitch_kvstore_miss_tokens_total") == 12 + 8
    assert value(scraped, "fastswitch_kvstore_evicted_blocks_total") == 0


async def test_a_failed_snapshot_leaves_the_other_metrics_scrapable() -> None:
    registry = CollectorRegistry()
    Gauge("fastswitch_test_alive", "always there", registry=registry).set(1)

    async def broken() -> int:
        raise RuntimeError("state unavailable")

    async def working() -> int:
        return 7

    loop = asyncio.get_running_loop()
    registry.register(ScrapeTimeCollector(loop, broken, lambda n: []))
    registry.register(ScrapeTimeCollector(
        loop, working, lambda n: [GaugeMetricFamily("fastswitch_test_read", "read", value=n)]))
    scraped = await scrape_registry(registry)
    assert value(scraped, "fastswitch_test_alive") == 1
    assert value(scraped, "fastswitch_test_read") == 7


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return samples(reply.read().decode())


def total(scraped: Samples, name: str) -> float:
    """The sum of a sample over all its label sets."""
    return sum(v for (n, _), v in scraped.items() if n == name)


@pytest.fixture
def metrics_ports() -> dict[str, int]:
    return {service: free_port() for service in ("scheduler", "executor", "kvstore")}


@pytest.fixture
def stack(metrics_ports: dict[str, int], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[LocalStack]:
    env = {f"FASTSWITCH_{s.upper()}_METRICS_PORT": str(p) for s, p in metrics_ports.items()}
    stack = LocalStack(StackConfig(num_gpu_blocks=64, num_host_blocks=512, extra_env=env,
                                   log_dir=str(tmp_path_factory.mktemp("metrics-logs"))))
    try:
        stack.start(scheduler=False)
        yield stack
    finally:
        stack.stop()


async def test_every_service_is_scraped_during_a_run_with_preemptions(
    stack: LocalStack, metrics_ports: dict[str, int]
) -> None:
    scheduler = stack.start_scheduler(extra_args=["--kv-blocks", "16"])
    n = 6
    async with FastSwitchClient(scheduler.address) as client:
        await client.wait_ready()
        gens = [client.generate("m" * 40, client_id=f"c{i}", max_tokens=24, priority=i % 3)
                for i in range(n)]
        tasks = [asyncio.create_task(g.collect()) for g in gens]
        while not any(g.tokens for g in gens):
            failed = [t for t in tasks if t.done()]
            assert not failed, failed[0].exception()
            await asyncio.sleep(0.02)
        during = await asyncio.to_thread(scrape, metrics_ports["scheduler"])
        await asyncio.gather(*tasks)
        stats = await client.stats()
    assert value(during, "fastswitch_scheduler_ttft_seconds_count") >= 1
    assert value(during, "fastswitch_scheduler_blocks", state="used") > 0

    sched, execu, store = await asyncio.gather(*(
        asyncio.to_thread(scrape, metrics_ports[s]) for s in ("scheduler", "executor", "kvstore")))
    completions = sum(g.final.completion_tokens for g in gens)
    assert value(sched, "fastswitch_scheduler_ttft_seconds_count") == n
    assert value(sched, "fastswitch_scheduler_tbt_seconds_count") == completions - n
    steps = value(sched, "fastswitch_scheduler_steps_total")
    assert value(sched, "fastswitch_scheduler_step_seconds_count") == steps
    assert value(execu, "fastswitch_executor_step_seconds_count") == steps
    assert value(sched, "fastswitch_scheduler_preemptions_total") > 0
    for name, expected in (("wasted_tokens", stats.wasted_tokens),
                          ("priority_inversions", stats.priority_inversions),
                          ("priority_inversion_seconds", stats.priority_inversion_s)):
        assert value(sched, f"fastswitch_scheduler_{name}_total") == pytest.approx(expected), name
    for direction in ("out", "in"):
        swaps = value(sched, "fastswitch_scheduler_swap_seconds_count", direction=direction)
        assert swaps > 0
        assert value(execu, "fastswitch_executor_swap_seconds_count", direction=direction) == swaps
        assert value(sched, "fastswitch_scheduler_swap_bytes_sum", direction=direction) == value(
            execu, "fastswitch_executor_swap_bytes_sum", direction=direction)
    assert value(sched, "fastswitch_scheduler_finished_requests_total") == n
    assert value(sched, "fastswitch_scheduler_requests", queue="waiting") == 0
    assert value(sched, "fastswitch_scheduler_blocks", state="free") == 16
    assert value(execu, "fastswitch_executor_swaps_in_flight") == 0
    assert value(execu, "fastswitch_executor_device_blocks") == 64
    assert value(execu, "fastswitch_executor_host_blocks") == 512
    assert value(store, "fastswitch_kvstore_capacity_blocks") == 512
    assert value(store, "fastswitch_kvstore_miss_tokens_total") > 0
    assert total(sched, "fastswitch_scheduler_rpc_errors_total") == 0
    assert total(store, "fastswitch_kvstore_rpc_errors_total") == 0

    async with FastSwitchClient(scheduler.address) as client:  # refused: counted by code
        with pytest.raises(grpc.aio.AioRpcError):
            await client.generate("", client_id="c").collect()
    key = ("fastswitch_scheduler_rpc_errors_total",
           (("code", "INVALID_ARGUMENT"), ("method", "Generate")))
    errors = await counted(
        lambda: asyncio.to_thread(scrape, metrics_ports["scheduler"]), key)
    assert errors.get(key) == 1
