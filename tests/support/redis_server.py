"""Throwaway Redis for tests (benchmarks/redis_process.py), never the machine's: one
server, or a 3-master Redis Cluster.

Without the binaries tests skip, unless FASTSWITCH_REQUIRE_REDIS=1 (as in CI), where a
missing Redis is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

import pytest
import redis

from benchmarks.redis_process import RedisProcess
from services.launch import free_port

CLUSTER_NODE_TIMEOUT_MS = 1000
CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on port + 10000


def cluster_ports(n: int) -> list[int]:
    """`n` ports free together with their cluster bus ports, none another's bus port."""
    taken: set[int] = set()
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        bus = port + CLUSTER_BUS_OFFSET
        if bus > 65535 or {port, bus} & taken or not _bindable(bus):
            continue
        taken |= {port, bus}
        ports.append(port)
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def redis_binary(name: str = "redis-server") -> str:
    """The binary's path, or a skip (a failure under FASTSWITCH_REQUIRE_REDIS=1)."""
    binary = shutil.which(name)
    if binary is None:
        message = f"{name} is not installed"
        if os.environ.get("FASTSWITCH_REQUIRE_REDIS") == "1":
            pytest.fail(f"{message}, and FASTSWITCH_REQUIRE_REDIS=1 forbids skipping")
        pytest.skip(f"{message} (set FASTSWITCH_REQUIRE_REDIS=1 to make this a failure)")
    return binary


class RedisServer(RedisProcess):
    def __init__(self, workdir: Path) -> None:
        super().__init__(redis_binary(), workdir)


class RedisClusterServer:
    """Three masters, no replicas, each in its own directory (which keeps its cluster
    config, so a stopped node started again rejoins with its slots, empty). Slots of a
    stopped master fail; the others keep serving (`cluster-require-full-coverage no`)."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        binary = redis_binary()
        self._cli = redis_binary("redis-cli")
        self.nodes: list[RedisProcess] = []
        for i, port in enumerate(cluster_ports(masters)):
            node_dir = workdir / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisProcess(binary, node_dir, port, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
                "--cluster-require-full-coverage", "no")))

    @property
    def url(self) -> str:
        """The store's `--redis-url` for this cluster (any node serves as the entry)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> Self:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [self._cli, "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30)
        self.wait_ok()
        return self

    def wait_ok(self, timeout_s: float = 20.0) -> None:
        """Returns once every running node reports the cluster whole."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._state(n) == "ok" for n in self.nodes):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis cluster did not come up")

    def master_of(self, key: str) -> RedisProcess:
        """The node serving `key`'s slot."""
        client = redis.Redis(port=self.nodes[0].port)
        try:
            slot = client.cluster("keyslot", key)
            for low, high, (_, port, *_), *_ in client.cluster("slots"):
                if low <= slot <= high:
                    return next(n for n in self.nodes if n.port == port)
        finally:
            client.close()
        raise LookupError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @staticmethod
    def _state(node: RedisProcess) -> str:
        client = redis.Redis(port=node.port)
        try:
            return client.cluster("info")["cluster_state"]
        except redis.RedisError:
            return "down"
        finally:
            client.close()
