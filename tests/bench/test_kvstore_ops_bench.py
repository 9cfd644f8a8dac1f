"""The KV store benchmark end to end on a tiny budget: a real store process over gRPC, for
each index backend, reporting every cell and leaving no shared-memory segment behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.kvstore_ops import OPS, main
from common.shm.arena import SHM_DIR
from tests.support.redis_server import redis_binary

pytestmark = pytest.mark.process


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_benchmark_reports_each_op_per_cell(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if backend == "redis":
        redis_binary()  # skips without redis-server; fails under FASTSWITCH_REQUIRE_REDIS=1
    out = tmp_path / "kvstore_ops.json"

    returned = main(["--json", str(out), "--seconds", "0.3", "--clients", "1", "8",
                     "--backends", backend])

    report = json.loads(out.read_text())
    assert report == returned
    cells = report["cells"]
    assert [(c["backend"], c["clients"]) for c in cells] == [(backend, 1), (backend, 8)]
    for cell in cells:
        assert cell["seconds"] > 0
        assert set(cell["ops"]) == set(OPS)
        for stats in cell["ops"].values():
            assert set(stats) == {"count", "ops_per_s", "p50_ms", "p99_ms"}
            assert stats["count"] > 0
            assert stats["ops_per_s"] > 0
            assert 0 < stats["p50_ms"] <= stats["p99_ms"]
        assert cell["ops"]["Reserve"]["count"] == cell["ops"]["Commit"]["count"]
        # Growing token lists find their committed prefix: the workload exercises reuse.
        assert 0 < cell["reserve_reused_fraction"] < 1

    [segment] = report["config"]["arena_segments"]
    assert segment.startswith("fastswitch-")
    assert not (SHM_DIR / segment).exists()
    table = capsys.readouterr().out
    assert all(f"{backend} " in table and op in table for op in OPS)
    assert report["redis_over_memory_64"] is None  # one backend, and no 64-client cell


def test_the_report_divides_redis_by_memory_at_64_clients(tmp_path: Path) -> None:
    redis_binary()
    out = tmp_path / "kvstore_ops.json"

    main(["--json", str(out), "--seconds", "0.3", "--clients", "64"])

    report = json.loads(out.read_text())
    rate = {c["backend"]: sum(s["count"] for s in c["ops"].values()) / c["seconds"]
            for c in report["cells"]}
    assert set(rate) == {"memory", "redis"}
    assert report["redis_over_memory_64"] == pytest.approx(rate["redis"] / rate["memory"])
    assert report["redis_over_memory_64"] > 0
    assert report["redis_over_memory"] == {"64": report["redis_over_memory_64"]}
