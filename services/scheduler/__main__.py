"""`python -m services.scheduler`: the public Generate API over an executor and KV stores.

Every flag also reads an environment variable (shown in --help); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import uvloop
from grpc_health.v1 import health_pb2

from common.chat_template import ChatTemplate, ChatTemplateError, find_template
from common.grpc_serving import (
    RefuseUndecodable,
    add_health_and_reflection,
    mark_serving,
    wait_for_stop_signal,
)
from common.kv.reuse_index import ReuseIndex
from common.metrics import serve_metrics
from common.shm.arena import HostArena
from common.tokenizer import TokenizerMismatch, check_fits, load_tokenizer
from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from protos import kvstore_pb2 as kv
from protos import kvstore_pb2_grpc as kv_grpc
from protos import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.core.config import Mode, SchedulerConfig
from services.scheduler.core.planner import Planner
from services.scheduler.core.policy import POLICIES
from services.scheduler.engine import Engine, EngineLimits
from services.scheduler.host_gateway import HostGateway, LocalHost
from services.scheduler.host_router import HostRouter, RoutedStore, StoreIdentity
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.prompts import Prompts
from services.scheduler.remote_host import RemoteHostKV
from services.scheduler.service import SchedulerService

log = logging.getLogger("fastswitch.scheduler")
T = TypeVar("T")
SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
# Redial a restarted executor or store within a second, not after gRPC's default backoff
# (up to two minutes), so that an outage ends when the service is back.
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250),
                   ("grpc.min_reconnect_backoff_ms", 250),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass(frozen=True)
class Flag:
    name: str
    env: str
    default: str
    help: str


FLAGS = [
    Flag("port", "FASTSWITCH_SCHEDULER_PORT", "50051", "port of the public API"),
    Flag("executor", "FASTSWITCH_EXECUTOR_ADDR", "127.0.0.1:50052", "executor address"),
    Flag("kvstore", "FASTSWITCH_KVSTORE_ADDR", "127.0.0.1:50053",
         "KV store address, or several separated by commas (instances sharing one Redis "
         "index), or 'embedded' for a host arena owned by this process"),
    Flag("mode", "FASTSWITCH_MODE", "fastswitch", "fastswitch, vllm-v1 or baseline"),
    Flag("switches", "FASTSWITCH_SWITCHES", "",
         "ablation: changes to the mode's switches, e.g. -turn_offload or +async_swaps "
         "(block_groups, async_swaps, host_reuse, turn_offload)"),
    Flag("policy", "FASTSWITCH_POLICY", "priority", "priority, vtc or fcfs"),
    Flag("max-num-seqs", "FASTSWITCH_MAX_NUM_SEQS", "32", "sequences per step"),
    Flag("max-batched-tokens", "FASTSWITCH_MAX_BATCHED_TOKENS", "256", "tokens per step"),
    Flag("max-waiting", "FASTSWITCH_MAX_WAITING", "256", "queued requests before refusing"),
    Flag("kv-blocks", "FASTSWITCH_KV_BLOCKS", "0",
         "use at most this many of the executor's device blocks (0: all of them)"),
    Flag("num-host-blocks", "FASTSWITCH_NUM_HOST_BLOCKS", "4096",
         "host blocks of the embedded arena"),
    Flag("tokenizer", "FASTSWITCH_TOKENIZER", "",
         "checkpoint folder whose tokenizer.json and chat template to use (default: the "
         "folder the executor serves, as its Describe names it); it must be the executor's"),
    Flag("connect-timeout", "FASTSWITCH_CONNECT_TIMEOUT_S", "60",
         "seconds to wait for the executor and the KV store at start"),
    Flag("outage-wait", "FASTSWITCH_OUTAGE_WAIT_S", "2",
         "seconds a request waits for an unavailable executor before it gets UNAVAILABLE"),
    Flag("kvstore-timeout", "FASTSWITCH_KVSTORE_TIMEOUT_S", "1",
         "deadline of each KV store call; a store that misses it is probed in the background"),
    Flag("shutdown-grace", "FASTSWITCH_SHUTDOWN_GRACE_S", "5",
         "seconds that requests in flight get to finish on SIGTERM before they are cancelled"),
    Flag("metrics-port", "FASTSWITCH_SCHEDULER_METRICS_PORT", "0",
         "port of the Prometheus /metrics endpoint (0: off)"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.scheduler", description=__doc__)
    for f in FLAGS:
        parser.add_argument(f"--{f.name}", default=os.environ.get(f.env, f.default),
                            help=f"{f.help} [env {f.env}, default {f.default!r}]")
    args = parser.parse_args(argv)
    if args.mode not in {m.value for m in Mode}:
        parser.error(f"--mode must be one of {[m.value for m in Mode]}, got {args.mode!r}")
    try:
        args.switches = Mode(args.mode).switches.with_spec(args.switches)
    except ValueError as e:
        parser.error(f"--switches: {e}")
    if args.policy not in POLICIES:
        parser.error(f"--policy must be one of {sorted(POLICIES)}, got {args.policy!r}")
    return args


async def wait_for(call: Awaitable[T], what: str) -> T:
    """Awaits a Describe made with `wait_for_ready` and a deadline, so a service that is
    still starting is waited for; one that never answers stops the scheduler."""
    try:
        return await call
    except grpc.RpcError as e:
        raise SystemExit(f"{what} not reachable: {e.code().name} {e.details()}") from e


def prompts_for(folder: str, desc: ex.DescribeResponse) -> Prompts:
    """The served checkpoint's tokenizer and chat template, checked against the executor's
    model; a scheduler that cannot read them refuses to start."""
    folder = folder or desc.checkpoint
    if not os.path.isdir(folder):
        raise SystemExit(
            f"the executor serves {desc.checkpoint!r}, which is not a folder here: pass "
            "--tokenizer (FASTSWITCH_TOKENIZER) with a copy of that checkpoint's tokenizer files")
    tokenizer = load_tokenizer(folder)
    try:
        check_fits(tokenizer, vocab_size=desc.vocab_size, fingerprint=desc.tokenizer_sha256)
        source = find_template(folder)
        template = None if source is None else ChatTemplate(source, tokenizer.special_tokens)
    except (TokenizerMismatch, ChatTemplateError) as e:
        raise SystemExit(f"tokenizer in {folder}: {e}") from e
    if template is None:
        log.warning("%s has no chat template: Chat and role messages are refused", folder)
    return Prompts(tokenizer, template)


async def connect_stores(
    addresses: list[str], executor: ex_grpc.ExecutorStub, desc: ex.DescribeResponse,
    timeout_s: float, call_timeout_s: float,
) -> tuple[HostRouter, list[grpc.aio.Channel]]:
    """Checks each store against the executor's blocks and model, and has the executor map
    the stores' arenas in the order given: global host block ids follow that order."""
    geometry = desc.geometry
    channels: list[grpc.aio.Channel] = []
    stores: list[RoutedStore] = []
    backends: set[str] = set()
    for address in addresses:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        channels.append(channel)
        stub = kv_grpc.KVStoreStub(channel)
        store: kv.DescribeResponse = await wait_for(
            stub.Describe(kv.DescribeRequest(), timeout=timeout_s, wait_for_ready=True),
            f"kvstore {address}")
        if store.block_bytes != geometry.block_bytes or store.block_size != geometry.block_size:
            raise SystemExit(
                f"kvstore {address} blocks ({store.block_size} tokens, {store.block_bytes} B) "
                f"differ from the executor's ({geometry.block_size} tokens, "
                f"{geometry.block_bytes} B)")
        if store.model_fingerprint != desc.model_fingerprint:
            raise SystemExit(
                f"kvstore {address} holds KV of model {store.model_fingerprint[:16]}, the "
                f"executor runs {desc.model_fingerprint[:16]}")
        attached = await executor.AttachHostArena(
            ex.AttachHostArenaRequest(name=store.arena_name))
        client = RemoteHostKV(channel, fingerprint=desc.model_fingerprint,
                              timeout_s=call_timeout_s)
        identity = StoreIdentity(store.instance_id, store.arena_name)
        stores.append(RoutedStore(client, identity, attached.first_host_block))
        backends.add(store.index_backend)
    if len(stores) > 1 and backends != {"redis"}:
        log.warning("KV stores without a shared Redis index cannot see each other's chains: "
                    "a conversation is found again only while this scheduler remembers it")
    try:
        router = HostRouter(stores, fingerprint=desc.model_fingerprint,
                            block_size=geometry.block_size)
    except ValueError as e:
        raise SystemExit(f"--kvstore {','.join(addresses)}: {e}") from e
    return router, channels


async def probe_stores(router: HostRouter, engine: Engine) -> None:
    """Probes stores that stopped answering, so that one which answers again is used (and
    Stats' kvstore_degraded clears) with no request's help; one that restarted with a new
    arena is used again once the executor has detached the old arena and mapped the new
    one."""
    while True:
        await asyncio.sleep(router.retry_s / 5)
        for index, identity in await router.probe_down():
            old = router.stores[index].identity.arena_name
            try:
                await detach(engine.executor, old)
                attached = await engine.executor.AttachHostArena(
                    ex.AttachHostArenaRequest(name=identity.arena_name), timeout=10)
            except grpc.aio.AioRpcError as e:
                log.warning("cannot map %s yet: %s", identity.arena_name, e.details())
                continue
            router.rejoin(index, identity, attached.first_host_block)
            engine.arena_names = tuple(s.identity.arena_name for s in router.stores)


async def detach(executor: ex_grpc.ExecutorStub, name: str) -> None:
    """Has the executor unmap a dead store's arena; one it does not map (it restarted
    since) is already gone."""
    try:
        await executor.DetachHostArena(ex.DetachHostArenaRequest(name=name), timeout=10)
    except grpc.aio.AioRpcError as e:
        if e.code() is not grpc.StatusCode.NOT_FOUND:
            raise


async def serve(args: argparse.Namespace) -> None:
    timeout = float(args.connect_timeout)
    executor_channel = grpc.aio.insecure_channel(args.executor, options=CHANNEL_OPTIONS)
    executor = ex_grpc.ExecutorStub(executor_channel)
    desc: ex.DescribeResponse = await wait_for(
        executor.Describe(ex.DescribeRequest(), timeout=timeout, wait_for_ready=True),
        "executor")
    geometry = desc.geometry
    prompts = prompts_for(args.tokenizer, desc)
    arena: HostArena | None = None
    host: HostGateway
    kv_channels: list[grpc.aio.Channel] = []
    if args.kvstore == "embedded":
        arena = HostArena.local(int(args.num_host_blocks), geometry.block_bytes)
        host = LocalHost(ReuseIndex(fingerprint=desc.model_fingerprint,
                                    block_size=geometry.block_size, num_blocks=arena.num_blocks))
        arena_names = [arena.name]
        attached = await executor.AttachHostArena(ex.AttachHostArenaRequest(name=arena.name))
        if attached.first_host_block:  # the index's block ids would be off by that much
            arena.close()
            arena.unlink()
            raise SystemExit("the executor already maps other host arenas; the embedded one "
                             "must be its first: restart the executor")
    else:
        addresses = [a.strip() for a in args.kvstore.split(",") if a.strip()]
        router, kv_channels = await connect_stores(addresses, executor, desc, timeout,
                                                   float(args.kvstore_timeout))
        host = router
        arena_names = [s.identity.arena_name for s in router.stores]
    config = SchedulerConfig(
        mode=Mode(args.mode),
        switches=args.switches,
        block_size=geometry.block_size,
        num_device_blocks=min(int(args.kv_blocks) or desc.num_gpu_blocks,
                              desc.num_gpu_blocks),
        max_num_seqs=int(args.max_num_seqs),
        max_batched_tokens=int(args.max_batched_tokens),
    )
    planner = Planner(config, POLICIES[args.policy](), desc.model_fingerprint)
    metrics = SchedulerMetrics()
    server = grpc.aio.server(interceptors=[metrics.rpc_errors, RefuseUndecodable()])
    health_servicer = add_health_and_reflection(server, SERVICE)

    async def on_health(ok: bool) -> None:
        """Readiness follows the executor: the Scheduler service is NOT_SERVING while it is
        unavailable; the server as a whole ("", liveness) stays SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if ok else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        await health_servicer.set(SERVICE, status)

    engine = Engine(
        planner, executor, host, tokenizer=prompts.tokenizer,
        limits=EngineLimits(max_model_len=desc.max_model_len, max_waiting=int(args.max_waiting),
                            outage_wait_s=float(args.outage_wait)),
        arena_names=arena_names, metrics=metrics, on_health=on_health,
        on_arenas=host.rebase if isinstance(host, HostRouter) else None,
    )
    await engine.start()
    prober = (asyncio.create_task(probe_stores(host, engine))
              if isinstance(host, HostRouter) else None)

    service = SchedulerService(engine, mode=args.mode, vocab_size=desc.vocab_size,
                               prompts=prompts,
                               eos_token_ids=desc.eos_token_ids or [desc.eos_token_id],
                               model=os.path.basename(os.path.normpath(desc.checkpoint)))
    metrics.watch(service.snapshot)
    serve_metrics(int(args.metrics_port), "0.0.0.0", metrics.registry)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    server.add_insecure_port(f"0.0.0.0:{args.port}")
    await server.start()
    await mark_serving(health_servicer, SERVICE)
    log.info("scheduler serving on :%s (%s mode %s, %s policy, %d device blocks, arenas %s)",
             args.port, args.mode, args.switches.describe(), args.policy,
             config.num_device_blocks, ", ".join(arena_names))

    await wait_for_stop_signal()
    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    if not await engine.drain(float(args.shutdown_grace)):
        log.warning("grace period over: cancelling the requests still in flight")
    await engine.close()  # fails what is left with UNAVAILABLE, lets swaps land
    if prober is not None:
        prober.cancel()
    await server.stop(grace=1)  # the streams have ended; let their last messages out
    await executor_channel.close()
    for channel in kv_channels:
        await channel.close()
    if arena is not None:
        arena.close()
        arena.unlink()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("FASTSWITCH_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
