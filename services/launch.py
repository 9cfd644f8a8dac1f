"""`python -m services.launch` (also `fastswitch up`): the whole stack as local processes.

Starts the executor (tiny checkpoint, CPU backend, fast path unless told otherwise), then
the KV store (or several, sharing one Redis index) with the executor's block geometry and
model fingerprint, then the scheduler, then (with --http-port) the OpenAI-compatible HTTP
front door; waits for each to report SERVING; restarts one that
dies, on its port and with its arguments, after a backoff that doubles from 1 s to 30 s
while restarts keep failing; and on Ctrl-C or SIGTERM stops them in reverse order.

Every service listens on 127.0.0.1. `fastswitch up` makes a random internal token per run
and gives it to the three through FASTSWITCH_INTERNAL_TOKEN, so that the executor and the
KV store serve only this run's scheduler; `--api-keys FILE` turns on tenants. `--tls-cert`,
`--tls-key` and `--tls-ca` put every gRPC listener on TLS (and the front door's channel to
the scheduler); `--tls-mutual` has the executor and the KV store require the certificate
of their callers too.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.auth import bearer_metadata, env_flag
from common.health_probe import check_http
from common.shm.arena import cleanup_stale
from common.tls import ADDRESS_UNAVAILABLE, ClientTls, sync_channel
from common.tls import ENV as TLS_ENV
from protos import executor_pb2 as ex
from protos import executor_pb2_grpc as ex_grpc
from services.executor.options import AUTO_DTYPE, BACKENDS, DTYPE_NAMES
from services.scheduler.core.config import Mode
from services.scheduler.core.policy import POLICIES

PORT_TRIES = 3  # ports `spawn` picks for a child before it gives up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildExited(RuntimeError):
    """A child process ended before it served, with `returncode`."""

    def __init__(self, name: str, returncode: int) -> None:
        super().__init__(f"{name} exited with code {returncode}")
        self.returncode = returncode


@dataclass
class StackConfig:
    mode: str = "fastswitch"
    switches: str = ""  # changes to the mode's switches, e.g. "-device_cache" (an ablation)
    policy: str = "priority"
    num_gpu_blocks: int = 256
    num_host_blocks: int = 4096
    block_size: int = 16
    checkpoint: str = ""  # empty: the executor writes and loads the tiny checkpoint
    backend: str = "cpu"
    dtype: str = ""  # empty: the executor's default (the checkpoint's own dtype)
    # Bit-identical steps whatever the batch: what tests and `make demo` compare tokens by.
    # `fastswitch up` serves the fast path unless asked.
    batch_invariant: bool = True
    redis_url: str = ""
    num_kvstores: int = 1  # more than one shares the index through redis_url
    # The scheduler finds the stores in redis_url's registry (and follows those that join
    # and leave) rather than being given their addresses.
    discover_kvstores: bool = False
    max_num_seqs: int = 32
    max_batched_tokens: int = 256
    lookahead: bool = True  # the scheduler sends step N+1 while step N runs
    scheduler_port: int = 0  # 0: a free port
    http_port: int | None = None  # the HTTP front door's; None: none, 0: a free port
    log_dir: str = ""  # empty: children inherit stderr
    extra_env: dict[str, str] = field(default_factory=dict)
    # Required by the executor and the KV store of every call, sent by the scheduler;
    # empty: none (`fastswitch up` makes one per run).
    internal_token: str = ""
    api_keys_file: str = ""  # the scheduler's --api-keys; empty: no tenants, open API
    scheduler_host: str = ""  # the scheduler's --host; empty: its default, 127.0.0.1
    # TLS on every listener with this certificate and key; clients check it against tls_ca.
    # tls_mutual: the executor and the KV store also require it as the client certificate.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_mutual: bool = False

    def __post_init__(self) -> None:
        if self.num_kvstores < 1:
            raise ValueError(f"num_kvstores must be at least 1, got {self.num_kvstores}")
        if self.num_kvstores > 1 and not self.redis_url:
            raise ValueError("num_kvstores > 1 needs redis_url: instances share one index")
        if self.discover_kvstores and not self.redis_url:
            raise ValueError("discover_kvstores needs redis_url: the registry is there")


@dataclass
class Child:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    args: Sequence[str] = ()  # what `spawn` was given, to start it again

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


class LocalStack:
    """Three processes on this machine; use as a context manager."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self.describe: ex.DescribeResponse | None = None

    @property
    def client_tls(self) -> ClientTls | None:
        """How to reach the children (None: plaintext); with mutual TLS, as the scheduler."""
        c = self.config
        if not c.tls_ca:
            return None
        mine = (c.tls_cert, c.tls_key) if c.tls_mutual else ("", "")
        return ClientTls(c.tls_ca, *mine)

    def channel(self, address: str) -> grpc.Channel:
        """A synchronous channel to a child, over TLS when the stack serves it."""
        return sync_channel(address, self.client_tls)

    @property
    def internal_metadata(self) -> tuple[tuple[str, str], ...]:
        """What a call to the executor or a KV store must carry (nothing without a token)."""
        return bearer_metadata(self.config.internal_token)

    @property
    def scheduler_address(self) -> str:
        return self._child("scheduler").address

    @property
    def executor_address(self) -> str:
        return self._child("executor").address

    @property
    def http_address(self) -> str:
        return self._child("http").address

    @property
    def kvstore_address(self) -> str:
        return self._child("kvstore").address

    @property
    def kvstore_addresses(self) -> list[str]:
        """Every running KV store, in start order (the scheduler's arena order)."""
        return [c.address for c in self.children if c.name == "kvstore"]

    def _child(self, name: str) -> Child:
        """The most recently started child called `name`."""
        return next(c for c in reversed(self.children) if c.name == name)

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0, *, scheduler: bool = True) -> None:
        c = self.config
        executor = self.spawn("executor", [
            "--num-gpu-blocks", str(c.num_gpu_blocks), "--block-size", str(c.block_size),
            "--backend", c.backend, *(["--checkpoint", c.checkpoint] if c.checkpoint else []),
            *(["--dtype", c.dtype] if c.dtype else []),
            "--batch-invariant" if c.batch_invariant else "--no-batch-invariant",
        ], timeout_s)
        with self.channel(executor.address) as channel:
            self.describe = ex_grpc.ExecutorStub(channel).Describe(
                ex.DescribeRequest(), metadata=self.internal_metadata)
        for _ in range(c.num_kvstores):
            self.start_kvstore(timeout_s=timeout_s)
        if scheduler:
            self.start_scheduler(timeout_s=timeout_s)
            if c.http_port is not None:
                self.start_http(timeout_s=timeout_s)

    def start_kvstore(self, *, extra_args: Sequence[str] = (), timeout_s: float = 120.0
                      ) -> Child:
        """Starts one more KV store for the executor's blocks and model."""
        c = self.config
        if self.describe is None:
            raise RuntimeError("start the executor first: stores take its blocks and model")
        geometry = self.describe.geometry
        return self.spawn("kvstore", [
            "--num-blocks", str(c.num_host_blocks), "--block-bytes", str(geometry.block_bytes),
            "--block-size", str(geometry.block_size),
            "--fingerprint", self.describe.model_fingerprint,
            *(["--redis-url", c.redis_url] if c.redis_url else []), *extra_args,
        ], timeout_s)

    def start_scheduler(
        self, *, mode: str = "", extra_args: Sequence[str] = (), timeout_s: float = 120.0
    ) -> Child:
        """Starts a scheduler against this stack's executor and its KV stores: those running
        now, or those registered in redis_url as they come and go (discover_kvstores)."""
        c = self.config
        stores = c.redis_url if c.discover_kvstores else ",".join(self.kvstore_addresses)
        return self.spawn("scheduler", [
            "--executor", self.executor_address, "--kvstore", stores,
            "--mode", mode or c.mode, f"--switches={c.switches}", "--policy", c.policy,
            "--max-num-seqs", str(c.max_num_seqs),
            "--max-batched-tokens", str(c.max_batched_tokens),
            "--lookahead", "1" if c.lookahead else "0",
            *(["--api-keys", c.api_keys_file] if c.api_keys_file else []),
            *(["--host", c.scheduler_host] if c.scheduler_host else []),
            *extra_args,
        ], timeout_s, port=c.scheduler_port or None)

    def start_http(self, *, extra_args: Sequence[str] = (), timeout_s: float = 120.0) -> Child:
        """Starts the HTTP front door over this stack's scheduler. With API keys its
        requests name no client id unless they say `user`: the key's tenant is theirs."""
        keyed = ["--client-id="] if self.config.api_keys_file else []
        return self.spawn("http", ["--scheduler", self.scheduler_address, *keyed, *extra_args],
                          timeout_s, port=self.config.http_port or None)

    def stop_child(self, child: Child, grace_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit code."""
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        if child in self.children:
            self.children.remove(child)
        return child.process.returncode

    def spawn(self, name: str, args: Sequence[str], timeout_s: float = 120.0,
              port: int | None = None) -> Child:
        """Starts `python -m services.<name> --port P ARGS` and waits until it serves; if it
        does not, kills it and raises. Without `port` it picks a free one; where another
        process takes that port before the child binds it (the child exits saying so), it
        picks again, `PORT_TRIES` times in all."""
        tried = 0
        while True:
            tried += 1
            try:
                return self._spawn_on(name, args, timeout_s, port or free_port())
            except ChildExited as exited:
                if port or tried == PORT_TRIES or exited.returncode != ADDRESS_UNAVAILABLE:
                    raise

    def _spawn_on(self, name: str, args: Sequence[str], timeout_s: float, port: int
                  ) -> Child:
        log = None
        if self.config.log_dir:
            Path(self.config.log_dir).mkdir(parents=True, exist_ok=True)
            log = open(Path(self.config.log_dir) / f"{name}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}", "--port", str(port), *args],
            stdout=log or None, stderr=subprocess.STDOUT if log else None,
            env={**os.environ, **self._child_env(name), **self.config.extra_env},
        )
        child = Child(name, f"127.0.0.1:{port}", process, tuple(args))
        try:
            wait_serving(child, timeout_s, self.client_tls)
        except BaseException:
            process.kill()
            process.wait()
            raise
        self.children.append(child)
        return child

    def _child_env(self, name: str) -> dict[str, str]:
        c = self.config
        env = {"FASTSWITCH_INTERNAL_TOKEN": c.internal_token,
               "FASTSWITCH_INTERNAL_TOKEN_FILE": ""} if c.internal_token else {}
        if c.tls_cert:
            env |= {"FASTSWITCH_TLS_CERT": c.tls_cert, "FASTSWITCH_TLS_KEY": c.tls_key,
                    "FASTSWITCH_TLS_CA": c.tls_ca}
            if c.tls_mutual:
                env |= {"FASTSWITCH_TLS_CLIENT_CERT": c.tls_cert,
                        "FASTSWITCH_TLS_CLIENT_KEY": c.tls_key}
                if name != "scheduler":  # its public API authenticates by API key
                    env["FASTSWITCH_TLS_CLIENT_CA"] = c.tls_ca
        return env

    def restart(self, child: Child, timeout_s: float = 120.0) -> Child:
        """Starts a dead child again, on its port, with its arguments."""
        if child in self.children:
            self.children.remove(child)
        return self.spawn(child.name, child.args, timeout_s, port=child.port)

    def stop(self, grace_s: float = 10.0) -> None:
        for child in reversed(list(self.children)):
            self.stop_child(child, grace_s)


def wait_serving(child: Child, timeout_s: float, tls: ClientTls | None = None) -> None:
    """Until the child's health check passes: gRPC health, or the front door's /health."""
    deadline = time.monotonic() + timeout_s
    if child.name == "http":
        while (problem := check_http(child.address, timeout_s=1)) is not None:
            if child.process.poll() is not None:
                raise ChildExited(child.name, child.process.returncode)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} not serving after {timeout_s:.0f} s: {problem}")
            time.sleep(0.2)
        return
    with sync_channel(child.address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if child.process.poll() is not None:
                raise ChildExited(child.name, child.process.returncode)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} not serving after {timeout_s:.0f} s")
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastswitch up", description=__doc__)
    d = StackConfig()
    parser.add_argument("--mode", default=os.environ.get("FASTSWITCH_MODE", d.mode),
                        choices=[m.value for m in Mode])
    parser.add_argument("--switches", default=os.environ.get("FASTSWITCH_SWITCHES", ""),
                        help="ablation: changes to the mode's switches, e.g. -device_cache")
    parser.add_argument("--policy", default=d.policy, choices=sorted(POLICIES))
    parser.add_argument("--lookahead", default=os.environ.get("FASTSWITCH_LOOKAHEAD", "1"),
                        choices=["0", "1"],
                        help="1: the scheduler sends step N+1 while step N runs [env "
                             "FASTSWITCH_LOOKAHEAD, default 1]")
    parser.add_argument("--num-gpu-blocks", type=int, default=d.num_gpu_blocks)
    parser.add_argument("--num-host-blocks", type=int, default=d.num_host_blocks)
    parser.add_argument("--checkpoint", default=os.environ.get("FASTSWITCH_CHECKPOINT", ""))
    parser.add_argument("--backend", default=d.backend, choices=BACKENDS)
    parser.add_argument("--dtype", default=os.environ.get("FASTSWITCH_DTYPE", ""),
                        choices=["", AUTO_DTYPE, *DTYPE_NAMES],
                        help="model and KV dtype [default: the checkpoint's]")
    parser.add_argument("--log-dir", default=os.environ.get(
        "FASTSWITCH_LOG_DIR", str(Path.home() / ".cache" / "fastswitch" / "logs")),
        help="each service logs to NAME.log here [env FASTSWITCH_LOG_DIR]")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="bit-identical steps whatever the batch (slower); "
                             "default: the fast path")
    parser.add_argument("--redis-url", default=os.environ.get("FASTSWITCH_REDIS_URL", ""))
    parser.add_argument("--num-kvstores", type=int, default=d.num_kvstores,
                        help="KV store instances; more than one needs --redis-url")
    parser.add_argument("--discover-kvstores", action="store_true",
                        default=os.environ.get("FASTSWITCH_DISCOVER_KVSTORES", "") == "1",
                        help="the scheduler follows the stores registered in --redis-url, "
                             "so stores started later are used [env "
                             "FASTSWITCH_DISCOVER_KVSTORES=1]")
    parser.add_argument("--port", type=int, default=int(
        os.environ.get("FASTSWITCH_SCHEDULER_PORT", "50051")))
    http_port = os.environ.get("FASTSWITCH_HTTP_PORT")
    parser.add_argument("--http-port", type=int, default=int(http_port) if http_port else None,
                        help="serve the OpenAI-compatible HTTP API on this port, bound to "
                             "127.0.0.1 [env FASTSWITCH_HTTP_PORT; default: off]")
    parser.add_argument("--host", default=os.environ.get("FASTSWITCH_SCHEDULER_HOST", ""),
                        help="the scheduler's bind address [default 127.0.0.1]; beyond "
                             "loopback it needs --api-keys or FASTSWITCH_INSECURE=1")
    parser.add_argument("--api-keys", default=os.environ.get("FASTSWITCH_API_KEYS_FILE", ""),
                        help="API key file ('KEY TENANT [user|admin]' a line): tenants on "
                             "[env FASTSWITCH_API_KEYS_FILE]")
    add_tls_flags(parser)
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_cert and not args.tls_ca):
        parser.error("TLS needs --tls-cert, --tls-key and --tls-ca together")
    if args.tls_mutual and not args.tls_cert:
        parser.error("--tls-mutual needs --tls-cert, --tls-key and --tls-ca")
    config = StackConfig(
        mode=args.mode, switches=args.switches, policy=args.policy,
        lookahead=args.lookahead == "1", num_gpu_blocks=args.num_gpu_blocks,
        num_host_blocks=args.num_host_blocks, checkpoint=args.checkpoint,
        backend=args.backend, dtype=args.dtype, batch_invariant=args.batch_invariant,
        redis_url=args.redis_url, num_kvstores=args.num_kvstores,
        discover_kvstores=args.discover_kvstores, scheduler_port=args.port,
        http_port=args.http_port, log_dir=args.log_dir, internal_token=secrets.token_urlsafe(32),
        api_keys_file=args.api_keys, scheduler_host=args.host, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_ca=args.tls_ca, tls_mutual=args.tls_mutual,
    )
    names = ["executor", "kvstore", "scheduler", *(["http"] if args.http_port is not None else [])]
    logs = [str(Path(args.log_dir) / f"{n}.log") for n in names]
    print(f"starting FastSwitch; the services log to {', '.join(logs)}", flush=True)
    for name in cleanup_stale():  # arenas of stores that died with no restart to inherit them
        print(f"removed the stale arena {name}", flush=True)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with LocalStack(config) as stack:
        print(f"FastSwitch is up ({config.mode} mode): scheduler {stack.scheduler_address}, "
              f"executor {stack.executor_address}, "
              f"kvstore {', '.join(stack.kvstore_addresses)}"
              + (f", OpenAI API http://{stack.http_address}/v1" if args.http_port is not None
                 else "")
              + ". Ctrl-C stops it.", flush=True)
        supervise(stack, lambda: stopping)
    return 0


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """`fastswitch up`'s TLS flags: one certificate for every service (see StackConfig)."""
    for flag, name, help in (
            ("--tls-cert", "cert", "certificate (PEM) every service presents: TLS on"),
            ("--tls-key", "key", "its private key (PEM)"),
            ("--tls-ca", "ca", "CA bundle (PEM) the certificate chains to, which the "
                               "services' clients check it against")):
        parser.add_argument(flag, default=os.environ.get(TLS_ENV[name], ""),
                            help=f"{help} [env {TLS_ENV[name]}]")
    parser.add_argument("--tls-mutual", action="store_true",
                        default=env_flag(os.environ, "FASTSWITCH_TLS_MUTUAL"),
                        help="the executor and the KV store also require the certificate of "
                             "their callers [env FASTSWITCH_TLS_MUTUAL=1]")


def supervise(stack: LocalStack, stopping: Callable[[], bool], backoff_s: float = 1.0,
              max_backoff_s: float = 30.0) -> None:
    """Restarts children that exit until `stopping()`; a failed restart doubles the wait
    before the next try, a successful one resets it."""
    wait = backoff_s
    while not stopping():
        dead = next((c for c in stack.children if c.process.poll() is not None), None)
        if dead is None:
            time.sleep(0.5)
            continue
        print(f"{dead.name} exited with code {dead.process.returncode}; restarting it",
              file=sys.stderr, flush=True)
        try:
            stack.restart(dead)
            wait = backoff_s
        except (RuntimeError, TimeoutError) as e:
            print(f"{dead.name} did not come back ({e}); next try in {wait:.0f} s",
                  file=sys.stderr, flush=True)
            stack.children.append(dead)  # still dead: tried again after the wait
            time.sleep(wait)
            wait = min(wait * 2, max_backoff_s)


if __name__ == "__main__":
    sys.exit(main())
