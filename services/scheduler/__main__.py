"""`python -m services.scheduler`: the public Generate API over an executor and KV stores.

Every flag also reads an environment variable (shown in --help); flags win.

Security (see common/auth.py and the README): it listens on 127.0.0.1 unless --host says
otherwise, and a non-loopback --host needs API keys (--api-keys) or --insecure. With keys,
every call carries `authorization: Bearer <key>` and is its tenant's. The internal token
(--internal-token or --internal-token-file), when set, goes with every call to the
executor and the KV stores, which refuse calls without it. TLS (common/tls.py): --tls-cert
and --tls-key for the public API, --tls-ca (and --tls-client-cert/-key for mutual TLS)
towards the executor and the stores.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Awaitable
from dataclasses import dataclass, fields
from typing import TypeVar

import grpc
import uvloop
from grpc_health.v1 import health_pb2

from common.auth import (
    KeyFileError,
    TenantLimits,
    bearer_interceptors,
    check_bind,
    env_flag,
    internal_token,
)
from common.chat_template import ChatTemplate, ChatTemplateError, find_template
from common.grpc_serving import (
    add_health_and_reflection,
    mark_serving,
    new_server,
    wait_for_stop_signal,
)
from common.key_reload import ReloadingKeys
from common.kv.reuse_index import ReuseIndex
from common.metrics import add_metrics_token_flags, metrics_token, serve_metrics
from common.shm.arena import HostArena
from common.tls import (
    ClientTls,
    add_client_flags,
    add_server_flags,
    aio_channel,
    client_tls,
    listen,
    server_tls,
)
from common.tokenizer import TokenizerMismatch, check_fits, load_tokenizer
from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from protos import scheduler_pb2, scheduler_pb2_grpc
from services.kvstore.redis_connect import async_redis_client, is_redis_url
from services.kvstore.redis_storage import check_stack_namespace
from services.scheduler.conversations import ConversationLimits
from services.scheduler.core.config import Mode, SchedulerConfig, Switches
from services.scheduler.core.planner import Planner
from services.scheduler.core.policy import POLICIES
from services.scheduler.core.preemption import PREEMPTION_POLICIES
from services.scheduler.engine import Engine, EngineLimits
from services.scheduler.host_router import HostRouter
from services.scheduler.host_tier import HostTier
from services.scheduler.local_host import LocalHost
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.prompts import Prompts
from services.scheduler.remote_tier import Transport
from services.scheduler.service import SchedulerService
from services.scheduler.step_log import StepLog
from services.scheduler.store_membership import StoreMembership, StoreRefused

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
    Flag("host", "FASTSWITCH_SCHEDULER_HOST", "127.0.0.1",
         "address the public API and /metrics listen on; beyond loopback it needs "
         "--api-keys or --insecure"),
    Flag("api-keys", "FASTSWITCH_API_KEYS_FILE", "",
         "API key file: 'KEY TENANT [user|admin] [LIMIT=N ...]' a line (empty: no keys, "
         "every caller may do everything); reloaded on SIGHUP and when it changes"),
    Flag("api-keys-poll", "FASTSWITCH_API_KEYS_POLL_S", "2",
         "seconds between checks of the API key file for a change"),
    Flag("tenant-max-queued", "FASTSWITCH_TENANT_MAX_QUEUED", "0",
         "requests a tenant may have queued (admitted, not running) before RESOURCE_EXHAUSTED, "
         "unless its key file entry sets max_queued (0: no cap; without keys, all callers "
         "together)"),
    Flag("tenant-max-priority", "FASTSWITCH_TENANT_MAX_PRIORITY", "",
         "highest priority a user may set on a request or with SetPriority, unless its key "
         "file entry sets max_priority (empty: no cap; admins are never capped)"),
    Flag("internal-token", "FASTSWITCH_INTERNAL_TOKEN", "",
         "token sent to the executor and the KV stores"),
    Flag("internal-token-file", "FASTSWITCH_INTERNAL_TOKEN_FILE", "",
         "file holding the internal token, created with a random one if absent"),
    Flag("conversation-ttl", "FASTSWITCH_CONVERSATION_TTL_S", "3600",
         "seconds a Chat conversation is kept idle before it is forgotten (0: forever)"),
    Flag("max-conversations", "FASTSWITCH_MAX_CONVERSATIONS", "1000",
         "Chat conversations kept per tenant (all together without keys), unless its key "
         "file entry sets max_conversations; the least recently used idle one is forgotten "
         "for a new one, and with all in a turn the new one is refused (0: no cap)"),
    Flag("executor", "FASTSWITCH_EXECUTOR_ADDR", "127.0.0.1:50052", "executor address"),
    Flag("kvstore", "FASTSWITCH_KVSTORE_ADDR", "127.0.0.1:50053",
         "KV store address, or several separated by commas (instances sharing one Redis "
         "index); or the stores' Redis index (redis://... or redis+cluster://...), whose "
         "registry is watched for stores that join and leave; or 'embedded' for a host "
         "arena owned by this process"),
    Flag("mode", "FASTSWITCH_MODE", "fastswitch", ", ".join(m.value for m in Mode)),
    Flag("switches", "FASTSWITCH_SWITCHES", "",
         "ablation: changes to the mode's switches, e.g. -turn_offload or +async_swaps "
         f"({', '.join(f.name for f in fields(Switches))})"),
    Flag("policy", "FASTSWITCH_POLICY", "priority", ", ".join(sorted(POLICIES))),
    Flag("preemption", "FASTSWITCH_PREEMPTION", "",
         f"when running requests give way: {', '.join(PREEMPTION_POLICIES)} (default: the "
         "mode's own)"),
    Flag("lookahead", "FASTSWITCH_LOOKAHEAD", "1",
         "1: plan and send step N+1 while step N runs, so the executor never waits for this "
         "loop (a token is wasted where a request finishes); 0: one step at a time"),
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
    Flag("kvstore-transport", "FASTSWITCH_KVSTORE_TRANSPORT", "auto",
         "how the executor reaches a store's blocks: auto (map its arena; over the gRPC bulk "
         "path through a local mirror if it is on another host) or bulk (always the bulk path)"),
    Flag("kvstore-timeout", "FASTSWITCH_KVSTORE_TIMEOUT_S", "1",
         "deadline of each KV store call; a store that misses it is probed in the background"),
    Flag("kvstore-renew", "FASTSWITCH_KVSTORE_RENEW_S", "2",
         "seconds between renewals of the KV stores' leases on the reservations and pins "
         "this scheduler holds; keep it well under the stores' --lease-seconds"),
    Flag("kvstore-namespace", "FASTSWITCH_KVSTORE_NAMESPACE", "",
         "the stack's namespace in the stores' shared Redis: only stores registered under "
         "it are found (the stores' --kvstore-namespace; default: none)"),
    Flag("shutdown-grace", "FASTSWITCH_SHUTDOWN_GRACE_S", "5",
         "seconds that requests in flight get to finish on SIGTERM before they are cancelled"),
    Flag("step-log", "FASTSWITCH_STEP_LOG", "",
         "file to append a JSON line to per completed step (each sequence's start and new "
         "tokens, the executor's seconds), as benchmarks.sim_vs_real reads it; empty: none"),
    Flag("metrics-port", "FASTSWITCH_SCHEDULER_METRICS_PORT", "0",
         "port of the Prometheus /metrics endpoint (0: off)"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.scheduler", description=__doc__)
    for f in FLAGS:
        parser.add_argument(f"--{f.name}", default=os.environ.get(f.env, f.default),
                            help=f"{f.help} [env {f.env}, default {f.default!r}]")
    parser.add_argument("--insecure", action="store_true",
                        default=env_flag(os.environ, "FASTSWITCH_INSECURE"),
                        help="serve a non-loopback --host without API keys [env "
                             "FASTSWITCH_INSECURE=1]")
    add_server_flags(parser, os.environ)
    add_client_flags(parser, os.environ, "the executor and the KV stores")
    add_metrics_token_flags(parser, os.environ)
    args = parser.parse_args(argv)
    if args.mode not in {m.value for m in Mode}:
        parser.error(f"--mode must be one of {[m.value for m in Mode]}, got {args.mode!r}")
    try:
        args.switches = Mode(args.mode).switches.with_spec(args.switches)
    except ValueError as e:
        parser.error(f"--switches: {e}")
    if args.kvstore_transport not in {t.value for t in Transport}:
        parser.error(f"--kvstore-transport must be one of {[t.value for t in Transport]}, "
                     f"got {args.kvstore_transport!r}")
    try:
        check_stack_namespace(args.kvstore_namespace)
    except ValueError as e:
        parser.error(f"--kvstore-namespace: {e}")
    try:
        if float(args.kvstore_renew) <= 0:
            raise ValueError(args.kvstore_renew)
    except ValueError:
        parser.error(f"--kvstore-renew must be positive seconds, got {args.kvstore_renew!r}")
    if args.policy not in POLICIES:
        parser.error(f"--policy must be one of {sorted(POLICIES)}, got {args.policy!r}")
    if args.lookahead not in ("0", "1"):
        parser.error(f"--lookahead must be 0 or 1, got {args.lookahead!r}")
    if args.preemption and args.preemption not in PREEMPTION_POLICIES:
        parser.error(f"--preemption must be one of {sorted(PREEMPTION_POLICIES)}, "
                     f"got {args.preemption!r}")
    try:
        ConversationLimits(float(args.conversation_ttl), int(args.max_conversations))
    except ValueError as e:
        parser.error(f"--conversation-ttl / --max-conversations: {e}")
    try:
        args.tenant_limits = tenant_limits(args)
        if float(args.api_keys_poll) <= 0:
            raise ValueError(f"--api-keys-poll must be positive, got {args.api_keys_poll}")
    except ValueError as e:
        parser.error(str(e))
    return args


def tenant_limits(args: argparse.Namespace) -> TenantLimits:
    """Every tenant's limits, from the flags (max_conversations is the conversations')."""
    queued, priority = args.tenant_max_queued.strip(), args.tenant_max_priority.strip()
    if not queued.isdigit():
        raise ValueError(f"--tenant-max-queued must be an integer >= 0 (0: no cap), got "
                         f"{queued!r}")
    if priority and not priority.lstrip("-").isdigit():
        raise ValueError(f"--tenant-max-priority must be an integer (empty: no cap), got "
                         f"{priority!r}")
    return TenantLimits(max_queued=int(queued), max_priority=int(priority) if priority else None)


async def wait_for(call: Awaitable[T], what: str) -> T:
    """Awaits a call made with `wait_for_ready` and a deadline (a Describe, a store's
    join), so a service that is still starting is waited for; one that never answers stops
    the scheduler."""
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
    source: str, executor: ex_grpc.ExecutorStub, desc: ex.DescribeResponse,
    args: argparse.Namespace, token: str, tls: ClientTls | None,
) -> tuple[StoreMembership, list[asyncio.Task[None]]]:
    """The router over the stores `source` names (an address list, or a Redis registry to
    watch), and the tasks that keep its membership (see store_membership)."""
    router = HostRouter(fingerprint=desc.model_fingerprint, block_size=desc.geometry.block_size)
    membership = StoreMembership(
        router, executor, desc,
        lambda address: aio_channel(address, tls, options=CHANNEL_OPTIONS,
                                    interceptors=bearer_interceptors(token)),
        call_timeout_s=float(args.kvstore_timeout),
        transport=Transport(args.kvstore_transport), namespace=args.kvstore_namespace)
    tasks = [asyncio.create_task(membership.probe()),
             asyncio.create_task(membership.renew(float(args.kvstore_renew)))]
    if is_redis_url(source):
        registry = async_redis_client(source)
        await membership.watch_once(registry)
        if not router.stores:
            log.warning("no KV store is registered in %s yet: preemption recomputes until "
                        "one is", source)
        tasks.append(asyncio.create_task(membership.watch(registry)))
        return membership, tasks
    addresses = [a.strip() for a in source.split(",") if a.strip()]
    for address in addresses:
        try:
            await wait_for(membership.join(address, float(args.connect_timeout)),
                           f"kvstore {address}")
        except StoreRefused as e:
            raise SystemExit(str(e)) from e
    if len(addresses) > 1 and membership.backends != {"redis"}:
        log.warning("KV stores without a shared Redis index cannot see each other's chains: "
                    "a conversation is found again only while this scheduler remembers it")
    return membership, tasks


async def expire_conversations(service: SchedulerService, ttl_s: float) -> None:
    """Forgets idle conversations (and frees their host KV) with no request's help."""
    while True:
        await asyncio.sleep(min(max(ttl_s / 4, 0.05), 60.0))
        try:
            await service.expire_conversations()
        except Exception:
            log.exception("expiring conversations failed; trying again later")


def load_keys(args: argparse.Namespace) -> ReloadingKeys | None:
    if not args.api_keys:
        return None
    try:
        keys = ReloadingKeys(args.api_keys, float(args.api_keys_poll))
    except KeyFileError as e:
        raise SystemExit(f"--api-keys: {e}") from e
    log.info("API keys: %d keys of %d tenants from %s", len(keys.keys), len(keys.keys.tenants),
             args.api_keys)
    return keys


def open_step_log(path: str) -> StepLog | None:
    """The step log, opened before anything is acquired, so that a bad path stops the
    scheduler with nothing to undo."""
    if not path:
        return None
    try:
        return StepLog(path)
    except OSError as e:
        raise SystemExit(f"--step-log {path}: {e.strerror or e}") from e


async def serve(args: argparse.Namespace) -> None:
    timeout = float(args.connect_timeout)
    keys = load_keys(args)
    step_log = open_step_log(args.step_log)
    check_bind(args.host, service="scheduler", credentials=keys is not None,
               insecure=args.insecure, what="API keys (--api-keys, FASTSWITCH_API_KEYS_FILE)")
    token = internal_token(args.internal_token, args.internal_token_file)
    tls, internal_tls = server_tls(args), client_tls(args)
    executor_channel = aio_channel(args.executor, internal_tls, options=CHANNEL_OPTIONS,
                                   interceptors=bearer_interceptors(token))
    executor = ex_grpc.ExecutorStub(executor_channel)
    desc: ex.DescribeResponse = await wait_for(
        executor.Describe(ex.DescribeRequest(), timeout=timeout, wait_for_ready=True),
        "executor")
    geometry = desc.geometry
    prompts = prompts_for(args.tokenizer, desc)
    arena: HostArena | None = None
    host: HostTier
    membership: StoreMembership | None = None
    keepers: list[asyncio.Task[None]] = []
    if args.kvstore == "embedded":
        arena = HostArena.local(int(args.num_host_blocks), geometry.block_bytes)
        host = LocalHost(ReuseIndex(fingerprint=desc.model_fingerprint,
                                    block_size=geometry.block_size, num_blocks=arena.num_blocks),
                         arena.name)
        attached = await executor.AttachHostArena(ex.AttachHostArenaRequest(name=arena.name))
        if attached.first_host_block:  # the index's block ids would be off by that much
            arena.close()
            arena.unlink()
            raise SystemExit("the executor already maps other host arenas; the embedded one "
                             "must be its first: restart the executor")
    else:
        membership, keepers = await connect_stores(args.kvstore, executor, desc, args, token,
                                                   internal_tls)
        host = membership.router
    config = SchedulerConfig(
        mode=Mode(args.mode),
        switches=args.switches,
        block_size=geometry.block_size,
        num_device_blocks=min(int(args.kv_blocks) or desc.num_gpu_blocks,
                              desc.num_gpu_blocks),
        max_num_seqs=int(args.max_num_seqs),
        max_batched_tokens=int(args.max_batched_tokens),
        max_waiting=int(args.max_waiting),
    )
    planner = Planner(config, POLICIES[args.policy](), desc.model_fingerprint,
                      PREEMPTION_POLICIES[args.preemption or config.mode.preemption]())
    metrics = SchedulerMetrics()
    server = new_server([metrics.rpc_errors])
    health_servicer = add_health_and_reflection(server, SERVICE)

    async def on_health(ok: bool) -> None:
        """Readiness follows the executor: the Scheduler service is NOT_SERVING while it is
        unavailable; the server as a whole ("", liveness) stays SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if ok else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        await health_servicer.set(SERVICE, status)

    engine = Engine(
        planner, executor, host, tokenizer=prompts.tokenizer,
        limits=EngineLimits(max_model_len=desc.max_model_len, lookahead=args.lookahead == "1",
                            outage_wait_s=float(args.outage_wait)),
        metrics=metrics, on_health=on_health, on_step=step_log.record if step_log else None,
    )
    await engine.start()

    service = SchedulerService(engine, mode=args.mode, vocab_size=desc.vocab_size,
                               prompts=prompts,
                               eos_token_ids=desc.eos_token_ids or [desc.eos_token_id],
                               model=os.path.basename(os.path.normpath(desc.checkpoint)),
                               keys=keys,
                               conversations=ConversationLimits(float(args.conversation_ttl),
                                                                int(args.max_conversations)),
                               tenant_limits=args.tenant_limits)
    expirer = (asyncio.create_task(expire_conversations(service, float(args.conversation_ttl)))
               if float(args.conversation_ttl) else None)
    key_watcher = asyncio.create_task(keys.watch()) if keys is not None else None
    if keys is None:  # SIGHUP asks for a reload; without a key file it must not stop the process
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, log.warning, "SIGHUP: no key file to reload (--api-keys is unset)")
    metrics.watch(service.snapshot, service.tenant_report)
    serve_metrics(int(args.metrics_port), args.host, metrics.registry,
                  metrics_token(args.metrics_token, args.metrics_token_file))
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    listen(server, f"{args.host}:{args.port}", tls)
    await server.start()
    await mark_serving(health_servicer, SERVICE)
    log.info("scheduler serving on %s:%s (%s mode %s, %s policy, %d device blocks, arenas "
             "%s, %s)", args.host, args.port, args.mode, args.switches.describe(), args.policy,
             config.num_device_blocks, ", ".join(host.arenas) or "none yet",
             ("API keys" if keys else "no API keys: open to all callers")
             + (", TLS" if tls.enabled else ""))

    await wait_for_stop_signal()
    log.info("shutting down")
    await health_servicer.enter_graceful_shutdown()
    if not await engine.drain(float(args.shutdown_grace)):
        log.warning("grace period over: cancelling the requests still in flight")
    await engine.close()  # fails what is left with UNAVAILABLE, lets swaps land
    if step_log is not None:
        step_log.close()
    for task in (*keepers, expirer, key_watcher):
        if task is not None:
            task.cancel()
    await server.stop(grace=1)  # the streams have ended; let their last messages out
    await executor_channel.close()
    if membership is not None:
        await membership.close()
    if arena is not None:
        arena.close()
        arena.unlink()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("FASTSWITCH_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
