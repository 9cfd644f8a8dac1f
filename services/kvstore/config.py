"""The store's settings: command-line flags, each defaulting to an environment variable."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.kvstore.arena_setup import default_arena_base

DEFAULT_PORT = 50053


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


def parse_config(
    argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ
) -> StoreConfig:
    def env_default(name: str, fallback: str | None = None) -> str | None:
        return env.get(f"FASTSWITCH_{name}", fallback)

    p = argparse.ArgumentParser(
        prog="python -m services.kvstore",
        description="FastSwitch host KV store. Geometry must match the executor's cache.",
    )
    p.add_argument("--host", default=env_default("KVSTORE_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(env_default("KVSTORE_PORT", str(DEFAULT_PORT))),
                   help="0 picks a free port (printed on the ready line)")
    p.add_argument("--redis-url", default=env_default("REDIS_URL"),
                   help="Redis index (e.g. redis://127.0.0.1:6379/0); absent: in-memory index")
    p.add_argument("--num-blocks", type=int, default=env_default("KVSTORE_NUM_BLOCKS", "1024"),
                   help="host blocks in the arena")
    p.add_argument("--block-bytes", type=int, default=env_default("KVSTORE_BLOCK_BYTES"),
                   required=env_default("KVSTORE_BLOCK_BYTES") is None,
                   help="bytes per block: layers * 2 * block_size * kv_heads * head_dim * dtype")
    p.add_argument("--block-size", type=int, default=env_default("KVSTORE_BLOCK_SIZE", "16"),
                   help="tokens per block")
    p.add_argument("--fingerprint", default=env_default("MODEL_FINGERPRINT"),
                   required=env_default("MODEL_FINGERPRINT") is None,
                   help="model fingerprint; calls carrying another one are rejected")
    p.add_argument("--instance-id", default=env_default("KVSTORE_INSTANCE_ID"),
                   help="stable id of this store (default: <hostname>-<port>); a restart "
                        "with the same id and Redis finds its index again")
    p.add_argument("--arena-name", default=env_default("KVSTORE_ARENA_NAME"),
                   help="shared-memory base name (default: fastswitch-kvstore-<instance id>)")
    p.add_argument("--lease-seconds", type=float,
                   default=env_default("KVSTORE_LEASE_SECONDS", "60"),
                   help="reservations and pins not finished within this are dropped")
    a = p.parse_args(argv)
    for flag in ("num_blocks", "block_bytes", "block_size", "lease_seconds"):
        if getattr(a, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
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
    )
