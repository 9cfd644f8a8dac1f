"""The running stack: executor, KV store and scheduler as real processes, over gRPC."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.client import FastSwitchClient, Generation, Sampling
from protos import scheduler_pb2
from services.launch import Child, LocalStack, StackConfig, free_port, supervise, wait_serving
from tests.support.stacks import executor_and_stores, settled_scheduler, settled_store

pytestmark = pytest.mark.process

DEVICE_BLOCKS = 128
SCHEDULER = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    config = StackConfig(num_gpu_blocks=DEVICE_BLOCKS, num_host_blocks=1024,
                         log_dir=str(tmp_path_factory.mktemp("logs")))
    with executor_and_stores(config) as s:
        yield s


def prompts(n: int, seed: int = 0) -> list[tuple[list[int], Sampling]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tokens = [rng.randrange(256) for _ in range(rng.randint(20, 90))]
        sampling = Sampling(temperature=0.8, top_p=0.9, seed=i) if i % 2 else Sampling()
        out.append((tokens, sampling))
    return out


async def run_requests(address: str, reqs, *, concurrent: bool, shuffle_priorities: bool
                       ) -> list[list[int]]:
    async with FastSwitchClient(address) as client:
        await client.wait_ready()

        async def one(i: int) -> list[int]:
            tokens, sampling = reqs[i]
            gen = client.generate(tokens, client_id=f"c{i % 3}", max_tokens=40,
                                  priority=i % 4, request_id=f"r{i}", sampling=sampling)
            await gen.collect()
            return [t.id for t in gen.tokens]

        if not concurrent:
            return [await one(i) for i in range(len(reqs))]

        async def reshuffle() -> None:
            rng = random.Random(1)
            while True:
                await asyncio.sleep(0.05)
                for i in range(len(reqs)):
                    await client.set_priority(rng.randrange(4), request_id=f"r{i}")

        updater = asyncio.create_task(reshuffle()) if shuffle_priorities else None
        try:
            return list(await asyncio.gather(*(one(i) for i in range(len(reqs)))))
        finally:
            if updater:
                updater.cancel()


async def stats(address: str):
    async with FastSwitchClient(address) as client:
        return await client.stats()


async def test_tokens_are_bit_exact_with_and_without_preemption(stack: LocalStack) -> None:
    reqs = prompts(8)
    outputs, preemptions = {}, {}
    for name, mode, budget, concurrent in [
        ("alone", "fastswitch", 0, False),
        ("fastswitch", "fastswitch", 24, True),
        ("baseline", "baseline", 24, True),
        ("vllm-v1", "vllm-v1", 24, True),
    ]:
        child = stack.start_scheduler(mode=mode, extra_args=["--kv-blocks", str(budget)])
        try:
            outputs[name] = await run_requests(child.address, reqs, concurrent=concurrent,
                                               shuffle_priorities=concurrent)
            preemptions[name] = (await stats(child.address)).preemptions
        finally:
            stack.stop_child(child)
    assert preemptions["alone"] == 0
    assert preemptions["fastswitch"] > 0 and preemptions["baseline"] > 0
    assert preemptions["vllm-v1"] > 0
    assert outputs["fastswitch"] == outputs["alone"]
    assert outputs["baseline"] == outputs["alone"]
    assert outputs["vllm-v1"] == outputs["alone"]
    assert all(len(o) > 0 for o in outputs["alone"])


async def test_second_turn_reuses_the_host_prefix(scheduler: Child) -> None:
    async with FastSwitchClient(scheduler.address) as client:
        await client.wait_ready()
        first = await client.chat("conv-reuse", "tell me about block groups and swaps",
                                  client_id="a", max_tokens=24).collect()
        assert first.final.reused_prompt_tokens == 0
        # Sent at once: it takes the finished turn's KV from the device prefix cache.
        second = await client.chat("conv-reuse", "and then?", client_id="a",
                                   max_tokens=8).collect()
        history = first.final.prompt_tokens + first.final.completion_tokens - 1
        assert second.final.reused_prompt_tokens == history // 16 * 16 > 0
        assert (await client.stats()).reuse_hit_tokens >= second.final.reused_prompt_tokens


async def test_without_the_device_cache_the_next_turn_swaps_in_its_host_prefix(
    stack: LocalStack,
) -> None:
    child = stack.start_scheduler(extra_args=["--switches=-device_cache"])
    try:
        async with FastSwitchClient(child.address) as client:
            first = await client.chat("conv-host", "tell me about block groups and swaps",
                                      client_id="a", max_tokens=24).collect()
            # Sent at once: it waits for the finished turn's copy to the host.
            second = await client.chat("conv-host", "and then?", client_id="a",
                                       max_tokens=8).collect()
            history = first.final.prompt_tokens + first.final.completion_tokens - 1
            assert second.final.reused_prompt_tokens == history // 16 * 16 > 0
            assert second.final.bytes_swapped > 0  # it came back from the host
    finally:
        stack.stop_child(child)


async def test_sighup_without_a_key_file_is_logged_and_stops_nothing(
        stack: LocalStack, scheduler: Child) -> None:
    """SIGHUP asks for a key reload; with no key file it is a no-op, not a hangup."""
    log = Path(stack.config.log_dir) / "scheduler.log"
    scheduler.process.send_signal(signal.SIGHUP)
    async with FastSwitchClient(scheduler.address) as client:
        await client.wait_ready()
        done = await client.generate("still here", client_id="a", max_tokens=4).collect()
        assert done.final.completion_tokens == 4
    assert scheduler.process.poll() is None
    assert "SIGHUP: no key file to reload" in log.read_text()


async def test_stop_token_ids_and_min_tokens(scheduler: Child) -> None:
    prompt = list(range(40, 90))
    async with FastSwitchClient(scheduler.address) as client:
        await client.wait_ready()
        free = [t.id for t in (await client.generate(prompt, client_id="a",
                                                      max_tokens=12).collect()).tokens]
        stop = free[3]
        first = free.index(stop)
        stopped = await client.generate(prompt, client_id="a", max_tokens=12,
                                        sampling=Sampling(stop_token_ids=[stop])).collect()
        assert [t.id for t in stopped.tokens] == free[: first + 1]
        assert stopped.final.finish_reason == "stop"
        held = await client.generate(prompt, client_id="a", max_tokens=12, sampling=Sampling(
            stop_token_ids=[stop], min_tokens=first + 2)).collect()
        ids = [t.id for t in held.tokens]
        assert ids[:first] == free[:first]
        assert stop not in ids[: first + 2] and len(ids) >= first + 2


async def test_edited_history_reuses_only_the_common_prefix(scheduler: Child) -> None:
    rng = random.Random(5)
    history = [rng.randrange(256) for _ in range(100)]
    async with FastSwitchClient(scheduler.address) as client:
        await client.wait_ready()
        await client.generate(history, client_id="a", conversation_id="edit",
                              max_tokens=4).collect()
        await asyncio.sleep(0.3)
        edited = list(history)
        edited[40] = (edited[40] + 1) % 256  # an edit inside block 2 (tokens 32..47)
        warm = await client.generate(edited, client_id="a", conversation_id="edit",
                                     max_tokens=16).collect()
        cold = await client.generate(edited, client_id="a", conversation_id="cold",
                                     max_tokens=16).collect()
    assert warm.final.reused_prompt_tokens == 32
    assert cold.final.reused_prompt_tokens == 0
    assert [t.id for t in warm.tokens] == [t.id for t in cold.tokens]


@pytest.mark.parametrize("scheduler", [("fastswitch", ["--kv-blocks", "24"]),
                                       ("baseline", ["--kv-blocks", "24"])], indirect=True)
async def test_nothing_leaks_after_cancels_disconnects_and_preemptions(
    stack: LocalStack, scheduler: Child
) -> None:
    reqs = prompts(10, seed=3)
    async with FastSwitchClient(scheduler.address) as client:
        await client.wait_ready()
        gens = [client.generate(t, client_id=f"c{i}", max_tokens=40, request_id=f"leak{i}",
                                priority=i % 3, conversation_id=f"leak-conv{i}", sampling=s)
                for i, (t, s) in enumerate(reqs)]
        tasks = [asyncio.create_task(g.collect()) for g in gens]
        await asyncio.sleep(0.3)
        assert await client.cancel("leak0") is True
        await client.cancel("leak1")
        gens[2].cancel()  # client disconnects
        gens[3].cancel()
        for i in range(10):
            await client.set_priority(9 - i, request_id=f"leak{i}")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i in range(4, 10):
            assert not isinstance(results[i], BaseException), results[i]
            assert results[i].final.finish_reason in ("length", "stop")
        s = await settled_scheduler(client)
    assert s.preemptions > 0
    assert (s.waiting, s.running, s.swapped) == (0, 0, 0)
    assert (s.running_blocks, s.swapped_blocks, s.draining_blocks) == (0, 0, 0)
    assert s.free_blocks + s.cached_blocks == 24 and s.swaps_in_flight == 0
    store = await settled_store(stack.kvstore_address)
    assert store.pinned_blocks == 0 and store.pending_reservations == 0


async def test_bad_input_gets_clear_status_codes(stack: LocalStack) -> None:
    child = stack.start_scheduler(extra_args=["--max-waiting", "2", "--kv-blocks", "8"])
    try:
        async with FastSwitchClient(child.address) as client:
            await client.wait_ready()
            cases = [
                (dict(prompt="hi", client_id="a", max_tokens=0), "max_tokens"),
                (dict(prompt="", client_id="a"), "empty"),
                (dict(prompt="hi", client_id=""), "client_id"),
                (dict(prompt="hi", client_id="a", sampling=Sampling(temperature=-1)),
                 "temperature"),
                (dict(prompt="hi", client_id="a", sampling=Sampling(temperature=float("nan"))),
                 "temperature"),
                (dict(prompt="hi", client_id="a", sampling=Sampling(top_p=1.5)), "top_p"),
                (dict(prompt="hi", client_id="a", sampling=Sampling(top_p=float("inf"))),
                 "top_p"),
                (dict(prompt="hi", client_id="a", max_tokens=4,
                      sampling=Sampling(min_tokens=5)), "min_tokens"),
                (dict(prompt="hi", client_id="a", sampling=Sampling(stop_token_ids=[10**6])),
                 "stop_token_ids"),
                (dict(prompt="", client_id="a", messages=[("robot", "hi")]), "role"),
                (dict(prompt=[1, 99999], client_id="a"), "token_ids.ids[1]"),
                (dict(prompt="x" * 5000, client_id="a"), "context"),
                (dict(prompt="x" * 200, client_id="a", max_tokens=8), "KV blocks"),
            ]
            for kwargs, needle in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.generate(**kwargs).collect()
                assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, kwargs
                assert needle in err.value.details(), err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.chat("", "hi", client_id="a").collect()
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.set_priority(1)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.cancel("")
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            # A full queue: two running (8 blocks hold two prompts), two waiting, then refusal.
            running = []
            for state in ("running", "waiting"):
                for _ in range(2):
                    gen = client.generate("y" * 60, client_id="q", max_tokens=60)
                    running.append(asyncio.create_task(gen.collect()))
                while getattr(await client.stats(), state) < 2:
                    await asyncio.sleep(0.01)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.generate("z" * 60, client_id="q", max_tokens=60).collect()
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in err.value.details()
            await asyncio.gather(*running)
            # A second turn while one is in flight on the same conversation.
            turn = client.chat("busy", "first", client_id="a", max_tokens=40)
            task = asyncio.create_task(turn.collect())
            await asyncio.sleep(0.1)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.chat("busy", "second", client_id="a").collect()
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            await task
    finally:
        stack.stop_child(child)


async def test_executor_death_fails_running_requests_then_service_resumes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    config = StackConfig(num_gpu_blocks=64, num_host_blocks=256,
                         log_dir=str(tmp_path_factory.mktemp("fault-logs")))
    with LocalStack(config) as stack:
        executor = stack._child("executor")
        address = stack.scheduler_address
        async with FastSwitchClient(address) as client:
            await client.wait_ready()
            gens = [client.generate("w" * 40, client_id="a", max_tokens=200) for _ in range(3)]
            tasks = [asyncio.create_task(g.collect()) for g in gens]
            while not any(g.tokens for g in gens):
                await asyncio.sleep(0.05)
            executor.process.send_signal(signal.SIGKILL)
            results = await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), timeout=30)
            for result in results:
                assert isinstance(result, grpc.aio.AioRpcError), result
                assert result.code() is grpc.StatusCode.UNAVAILABLE
            stack.children.remove(executor)
            assert not (await client.stats()).executor_available
            assert health(address, SCHEDULER) == NOT_SERVING  # not ready ...
            assert health(address, "") == SERVING  # ... but alive
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.generate("during", client_id="a", max_tokens=8).collect()
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 4  # the 2 s outage wait, not the deadline
            port = int(executor.address.rsplit(":", 1)[1])
            stack.spawn("executor", ["--num-gpu-blocks", "64", "--block-size", "16"], port=port)
            await wait_until(lambda: health(address, SCHEDULER) == SERVING, 5)
            after: Generation = await asyncio.wait_for(
                client.generate("hello again", client_id="a", max_tokens=8).collect(), 60)
            assert after.final.completion_tokens > 0
            s = await client.stats()
            assert s.executor_available
            assert health(address, SCHEDULER) == SERVING


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2).status


async def test_executor_dying_while_idle_turns_readiness_off_and_back_on(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """No request needs to notice: the scheduler probes the executor."""
    config = StackConfig(num_gpu_blocks=64, num_host_blocks=256,
                         log_dir=str(tmp_path_factory.mktemp("idle-fault-logs")))
    with LocalStack(config) as own:
        executor = own._child("executor")
        address = own.scheduler_address
        executor.process.send_signal(signal.SIGKILL)
        executor.process.wait()
        own.children.remove(executor)
        await wait_until(lambda: health(address, SCHEDULER) == NOT_SERVING, 5)
        port = int(executor.address.rsplit(":", 1)[1])
        own.spawn("executor", ["--num-gpu-blocks", "64", "--block-size", "16"], port=port)
        await wait_until(lambda: health(address, SCHEDULER) == SERVING, 5)


async def test_a_stopped_kvstore_does_not_hold_up_stats_or_requests(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """SIGSTOP the store: Stats answers at once, requests still run (recomputing), and once
    the store is continued kvstore_degraded clears without any request's help."""
    # Without the device prefix cache, so that the next turn asks the store.
    config = StackConfig(num_gpu_blocks=64, num_host_blocks=256, switches="-device_cache",
                         log_dir=str(tmp_path_factory.mktemp("stop-logs")))
    with LocalStack(config) as stack:
        store = stack._child("kvstore")
        async with FastSwitchClient(stack.scheduler_address) as client:
            await client.wait_ready()
            await client.chat("c", "hello there", client_id="a", max_tokens=4).collect()
            store.process.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                turn = await asyncio.wait_for(
                    client.chat("c", "and again", client_id="a", max_tokens=4).collect(), 30)
                assert turn.final.completion_tokens > 0
                assert time.monotonic() - started < 4  # one store call's 1 s deadline or so
                for _ in range(5):
                    started = time.monotonic()
                    s = await client.stats()
                    assert time.monotonic() - started < 1
                assert s.kvstore_degraded
            finally:
                store.process.send_signal(signal.SIGCONT)

            async def degraded() -> bool:
                return (await client.stats()).kvstore_degraded

            deadline = time.monotonic() + 15
            while await degraded():
                assert time.monotonic() < deadline, "kvstore_degraded stayed on"
                await asyncio.sleep(0.2)


async def wait_until(check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def test_scheduler_waits_for_a_kvstore_that_starts_after_it(stack: LocalStack) -> None:
    port, scheduler_port = free_port(), free_port()
    scheduler = subprocess.Popen([
        sys.executable, "-m", "services.scheduler", "--port", str(scheduler_port),
        "--executor", stack.executor_address, "--kvstore", f"127.0.0.1:{port}",
        "--connect-timeout", "60",
    ])
    child = Child("scheduler", f"127.0.0.1:{scheduler_port}", scheduler)
    try:
        time.sleep(2)  # the scheduler is up and waiting; the store is not there yet
        assert scheduler.poll() is None, "the scheduler gave up on a store still starting"
        d = stack.describe
        assert d is not None
        store = stack.spawn("kvstore", [
            "--num-blocks", "64", "--block-bytes", str(d.geometry.block_bytes),
            "--block-size", str(d.geometry.block_size), "--fingerprint", d.model_fingerprint,
        ], port=port)
        wait_serving(child, 60)
        assert stack.stop_child(child) == 0
        stack.stop_child(store)
    finally:
        if scheduler.poll() is None:
            scheduler.kill()


async def test_fastswitch_up_restarts_a_dead_kvstore_and_the_scheduler_takes_it_back(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`supervise` (fastswitch up's loop) brings back a killed KV store; the scheduler has
    the executor map its new arena, and the next conversation reuses host KV again."""
    config = StackConfig(num_gpu_blocks=64, num_host_blocks=256,
                         log_dir=str(tmp_path_factory.mktemp("supervise-logs")))
    with LocalStack(config) as stack:
        stopping = threading.Event()
        loop = threading.Thread(target=supervise, args=(stack, stopping.is_set), daemon=True)
        loop.start()
        address = stack.scheduler_address
        try:
            async with FastSwitchClient(address) as client:
                await client.wait_ready()
                store = stack._child("kvstore")
                store.process.send_signal(signal.SIGKILL)
                await wait_until(lambda: any(
                    c.name == "kvstore" and c is not store for c in list(stack.children)), 60)
                await wait_until(lambda: health(address, SCHEDULER) == SERVING, 30)
                deadline = time.monotonic() + 30
                while (await client.stats()).kvstore_degraded:
                    assert time.monotonic() < deadline, "the restarted store was not taken back"
                    await asyncio.sleep(0.5)
                await client.chat("after", "tell me about block groups and swaps",
                                  client_id="a", max_tokens=24).collect()
                await asyncio.sleep(0.3)
                turn = await client.chat("after", "and then?", client_id="a",
                                         max_tokens=8).collect()
                assert turn.final.reused_prompt_tokens > 0
        finally:
            stopping.set()
            loop.join(30)


def test_scheduler_refuses_a_tokenizer_that_is_not_the_executors(
    stack: LocalStack, smollm2: Path
) -> None:
    d = stack.describe
    assert d is not None and Path(d.checkpoint).is_dir()
    assert d.tokenizer_sha256 == ""  # the tiny model has byte-level tokens
    with pytest.raises(RuntimeError, match="scheduler exited with code 1"):
        stack.start_scheduler(extra_args=["--tokenizer", str(smollm2)], timeout_s=60)
    log = (Path(stack.config.log_dir) / "scheduler.log").read_text()
    assert "the executor's checkpoint has byte-level" in log


@pytest.mark.parametrize("service", ["scheduler", "executor", "kvstore"])
async def test_undecodable_requests_get_invalid_argument(
    stack: LocalStack, scheduler: Child, service: str
) -> None:
    """Invalid UTF-8 in a string field, and bytes that are no message at all."""
    address, method = {
        "scheduler": (scheduler.address, "/fastswitch.scheduler.v1.Scheduler/Cancel"),
        "executor": (stack.executor_address, "/fastswitch.executor.v1.Executor/AttachHostArena"),
        "kvstore": (stack.kvstore_address, "/fastswitch.kvstore.v1.KVStore/Batch"),
    }[service]
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method, request_serializer=None,
                                   response_deserializer=None)
        for payload in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(payload, timeout=10)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, payload
            assert "does not parse" in err.value.details()
    log = (Path(stack.config.log_dir) / f"{service}.log").read_text()
    assert "request does not parse" in log
    assert "Exception deserializing" not in log  # grpc's own traceback for it
