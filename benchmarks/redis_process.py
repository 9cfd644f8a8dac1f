"""A throwaway redis-server: its own free port and directory, no persistence.

Benchmarks and tests never touch a Redis the machine may already run (on 6379 or
anywhere): what they write, flush or kill must be theirs alone.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import redis

from services.launch import free_port


@dataclass
class RedisProcess:
    binary: str
    workdir: Path
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()  # more redis-server options, e.g. cluster mode
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        """Starts the server (unless it runs) and returns once it answers a PING."""
        if self._process is not None:
            return self
        self._process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1.0)
        try:
            for _ in range(200):
                if self._process.poll() is not None:
                    break
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        """Kills the server: nothing in it is worth a graceful shutdown."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
