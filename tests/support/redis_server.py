"""A throwaway redis-server for tests (benchmarks/redis_process.py), never the machine's.

Without the binary tests skip, unless FASTSWITCH_REQUIRE_REDIS=1 (as in CI), where a missing
Redis is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks.redis_process import RedisProcess


def redis_binary() -> str:
    """The redis-server path, or a skip (a failure under FASTSWITCH_REQUIRE_REDIS=1)."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed"
        if os.environ.get("FASTSWITCH_REQUIRE_REDIS") == "1":
            pytest.fail(f"{message}, and FASTSWITCH_REQUIRE_REDIS=1 forbids skipping")
        pytest.skip(f"{message} (set FASTSWITCH_REQUIRE_REDIS=1 to make this a failure)")
    return binary


class RedisServer(RedisProcess):
    def __init__(self, workdir: Path) -> None:
        super().__init__(redis_binary(), workdir)
