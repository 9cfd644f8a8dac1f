"""The remote-tier benchmark on a tiny budget: a real store process, the shm and the bulk
path side by side, over loopback and over a veth link to a namespace of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.remote_tier import PATHS
from common.shm.arena import SHM_DIR

pytestmark = pytest.mark.process

REPO = Path(__file__).resolve().parents[2]
BLOCKS, BLOCK_BYTES, REPEATS = 4, 3 << 17, 2  # 1.5 MiB: two bulk chunks per transfer


@pytest.mark.parametrize("netns", [False, True])
def test_the_benchmark_reports_both_paths_both_ways(tmp_path: Path, netns: bool) -> None:
    out = tmp_path / "nested" / "remote_tier.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.remote_tier", "--blocks", str(BLOCKS),
         "--block-bytes", str(BLOCK_BYTES), "--repeats", str(REPEATS), "--json", str(out),
         *(["--netns"] if netns else [])],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True)

    report = json.loads(out.read_text())
    assert report["config"]["bytes"] == BLOCKS * BLOCK_BYTES
    assert report["config"]["netns"] is netns
    assert report["config"]["store"].startswith("10.") is netns  # the veth link, or loopback
    for path in PATHS:
        assert len(report["seconds"][path]) == REPEATS
        assert report[f"{path}_gbps"] > 0
    for way in ("write", "read"):
        assert report[f"bulk_over_shm_{way}"] == pytest.approx(
            report[f"bulk_{way}_gbps"] / report[f"shm_{way}_gbps"])
    assert not (SHM_DIR / report["config"]["mirror"]).exists()
    assert "bulk/shm" in done.stdout
    assert done.stderr.count("repeat ") == REPEATS
