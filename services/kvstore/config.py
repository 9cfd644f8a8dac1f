"""The store's settings: command-line flags, each defaulting to an environment variable.

The block geometry and model fingerprint must be the executor's. They are given either as
flags, or by `--from-executor HOST:PORT`, which asks the executor's Describe at start (what
docker-compose does: the store starts once the executor is healthy).

It listens on 127.0.0.1 unless --host says otherwise. With an internal token
(FASTSWITCH_INTERNAL_TOKEN, or FASTSWITCH_INTERNAL_TOKEN_FILE, shared by every service) it
refuses calls without it, and sends it to the --from-executor executor; a non-loopback
--host without a token is refused at start unless --insecure (FASTSWITCH_INSECURE=1).
TLS (common/tls.py): --tls-cert/--tls-key (and --tls-client-ca for mutual TLS) for its own
listener, --tls-ca (and --tls-client-cert/-key) towards the --from-executor executor.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc

from common.auth import BOOLEANS, bearer_metadata, internal_token
from common.metrics import add_metrics_token_flags, metrics_token
from common.tls import ClientTls, ServerTls, add_client_flags, add_server_flags, sync_channel
from protos import executor_pb2, executor_pb2_grpc
from services.kvstore.arena_setup import default_arena_base
from services.kvstore.redis_storage import check_stack_namespace

NO_TLS = ServerTls()
DEFAULT_PORT = 50053
DEFAULT_BLOCK_SIZE = 16
DEFAULT_LEASE_SECONDS = 10.0  # schedulers renew theirs every 2 s (--kvstore-renew)
# Reconnect quickly while the executor comes up, rather than backing off to minutes.
_WAIT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    host: str
    port: int
    redis_url: str | None
    num_blocks: int
    block_bytes: int
    block_size: int
    fingerprint: str
    arena_name: str  # segment base name; each start appends a random epoch
    instance_id: str
    lease_seconds: float
    namespace: str = ""  # the stack's namespace in a shared Redis (redis_storage.Namespace)
    metrics_port: int = 0  # 0: no /metrics endpoint
    metrics_token: str = ""  # scrapes must send it (empty: /metrics is open)
    internal_token: str = ""  # given as a value; `token()` also reads the file
    internal_token_file: str = ""
    insecure: bool = False  # a non-loopback host without a token is allowed
    tls: ServerTls = NO_TLS  # of its own listener

    def token(self) -> str:
        """The internal token callers must send (empty: none required)."""
        return internal_token(self.internal_token, self.internal_token_file)


@dataclass(frozen=True, slots=True)
class ExecutorGeometry:
    block_bytes: int
    block_size: int
    fingerprint: str


class ExecutorUnreachable(RuntimeError):
    """--from-executor named an executor that did not answer Describe in time."""


def describe_executor(address: str, timeout_s: float, token: str = "",
                      tls: ClientTls | None = None) -> ExecutorGeometry:
    """The executor's block geometry and fingerprint, waiting up to `timeout_s` for it;
    `token` is the internal token, sent when set."""
    with sync_channel(address, tls, options=_WAIT_OPTIONS) as channel:
        try:
            d = executor_pb2_grpc.ExecutorStub(channel).Describe(
                executor_pb2.DescribeRequest(), timeout=timeout_s, wait_for_ready=True,
                metadata=bearer_metadata(token),
            )
        except grpc.RpcError as e:
            raise ExecutorUnreachable(
                f"executor {address} did not answer Describe: {e.code().name} {e.details()}"
            ) from e
    return ExecutorGeometry(d.geometry.block_bytes, d.geometry.block_size, d.model_fingerprint)


def parse_config(
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] = os.environ,
    describe: Callable[[str, float], ExecutorGeometry] | None = None,
) -> StoreConfig:
    """`describe` asks an executor for its geometry (default: `describe_executor`, with
    the internal token)."""
    def env_default(name: str, fallback: str | None = None) -> str | None:
        return env.get(f"FASTSWITCH_{name}", fallback)

    p = argparse.ArgumentParser(
        prog="python -m services.kvstore",
        description="FastSwitch host KV store. Geometry must match the executor's cache.",
    )
    p.add_argument("--host", default=env_default("KVSTORE_HOST", "127.0.0.1"),
                   help="bind address; beyond loopback it needs an internal token or --insecure")
    p.add_argument("--port", type=int, default=int(env_default("KVSTORE_PORT", str(DEFAULT_PORT))),
                   help="0 picks a free port (printed on the ready line)")
    p.add_argument("--redis-url", default=env_default("REDIS_URL"),
                   help="Redis index (e.g. redis://127.0.0.1:6379/0); absent: in-memory index")
    p.add_argument("--num-blocks", type=int, default=env_default("KVSTORE_NUM_BLOCKS", "1024"),
                   help="host blocks in the arena")
    p.add_argument("--from-executor", default=env_default("KVSTORE_FROM_EXECUTOR"),
                   metavar="HOST:PORT",
                   help="take the block geometry and fingerprint from this executor's Describe, "
                        "waiting for it to answer (instead of the next three flags)")
    p.add_argument("--connect-timeout", type=float,
                   default=env_default("KVSTORE_CONNECT_TIMEOUT_S", "60"),
                   help="seconds to wait for the --from-executor executor")
    p.add_argument("--block-bytes", type=int, default=env_default("KVSTORE_BLOCK_BYTES"),
                   help="bytes per block: layers * 2 * block_size * kv_heads * head_dim * dtype")
    p.add_argument("--block-size", type=int, default=env_default("KVSTORE_BLOCK_SIZE"),
                   help=f"tokens per block (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--fingerprint", default=env_default("MODEL_FINGERPRINT"),
                   help="model fingerprint; calls carrying another one are rejected")
    p.add_argument("--instance-id", default=env_default("KVSTORE_INSTANCE_ID"),
                   help="stable id of this store (default: <hostname>-<port>); a restart "
                        "with the same id and Redis finds its index again")
    p.add_argument("--arena-name", default=env_default("KVSTORE_ARENA_NAME"),
                   help="shared-memory base name (default: fastswitch-kvstore-<instance id>)")
    p.add_argument("--lease-seconds", type=float,
                   default=env_default("KVSTORE_LEASE_SECONDS", str(DEFAULT_LEASE_SECONDS)),
                   help="reservations and pins neither finished nor renewed by their holder "
                        "within this are dropped, and repeated request ids are answered "
                        "from the first answer for this long "
                        "[env FASTSWITCH_KVSTORE_LEASE_SECONDS]")
    p.add_argument("--kvstore-namespace", default=env_default("KVSTORE_NAMESPACE", ""),
                   help="this stack's namespace in a shared Redis: stores and schedulers "
                        "under another one never see these chains or stores (default: none) "
                        "[env FASTSWITCH_KVSTORE_NAMESPACE]")
    p.add_argument("--metrics-port", type=int, default=env_default("KVSTORE_METRICS_PORT", "0"),
                   help="port of the Prometheus /metrics endpoint (0: off)")
    p.add_argument("--internal-token", default=env_default("INTERNAL_TOKEN", ""),
                   help="refuse calls without 'authorization: Bearer <token>' "
                        "[env FASTSWITCH_INTERNAL_TOKEN]")
    p.add_argument("--internal-token-file", default=env_default("INTERNAL_TOKEN_FILE", ""),
                   help="file holding the token, created with a random one if absent "
                        "[env FASTSWITCH_INTERNAL_TOKEN_FILE]")
    insecure = (env_default("INSECURE", "") or "").strip().lower()
    if insecure not in BOOLEANS:
        p.error(f"FASTSWITCH_INSECURE={insecure!r} is not a boolean")
    p.add_argument("--insecure", action="store_true", default=BOOLEANS[insecure],
                   help="serve a non-loopback --host without a token [env FASTSWITCH_INSECURE=1]")
    add_server_flags(p, env)
    add_client_flags(p, env, "the --from-executor executor")
    add_metrics_token_flags(p, env)
    a = p.parse_args(argv)
    given = [f"--{f.replace('_', '-')}" for f in ("block_bytes", "block_size", "fingerprint")
             if getattr(a, f) is not None]
    if a.from_executor:
        if given:
            p.error(f"--from-executor takes the geometry from the executor; drop {given}")
        if describe is None:
            describe = functools.partial(
                describe_executor, token=internal_token(a.internal_token, a.internal_token_file),
                tls=ClientTls(a.tls_ca, a.tls_client_cert, a.tls_client_key, a.tls_server_name))
        try:
            geometry = describe(a.from_executor, a.connect_timeout)
        except ExecutorUnreachable as e:
            p.error(str(e))
        a.block_bytes, a.block_size, a.fingerprint = (
            geometry.block_bytes, geometry.block_size, geometry.fingerprint)
    elif a.block_bytes is None or a.fingerprint is None:
        p.error("give --block-bytes and --fingerprint, or --from-executor")
    if a.block_size is None:
        a.block_size = DEFAULT_BLOCK_SIZE
    for flag in ("num_blocks", "block_bytes", "block_size", "lease_seconds"):
        if getattr(a, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    try:
        check_stack_namespace(a.kvstore_namespace)
    except ValueError as e:
        p.error(str(e))
    instance_id = a.instance_id or f"{socket.gethostname()}-{a.port}"
    return StoreConfig(
        host=a.host,
        port=a.port,
        redis_url=a.redis_url,
        num_blocks=a.num_blocks,
        block_bytes=a.block_bytes,
        block_size=a.block_size,
        fingerprint=a.fingerprint,
        arena_name=a.arena_name or default_arena_base(instance_id),
        instance_id=instance_id,
        lease_seconds=a.lease_seconds,
        namespace=a.kvstore_namespace,
        metrics_port=a.metrics_port,
        metrics_token=metrics_token(a.metrics_token, a.metrics_token_file),
        internal_token=a.internal_token,
        internal_token_file=a.internal_token_file,
        insecure=a.insecure,
        tls=ServerTls(a.tls_cert, a.tls_key, a.tls_client_ca),
    )
