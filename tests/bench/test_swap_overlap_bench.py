"""The swap-overlap benchmark on the CPU backend and a toy random model: all three phases
run, swaps complete all along the busy one and alone in the copies one, and the JSON reports
the ratio it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.swap_overlap import main


def test_every_phase_runs_and_the_copies_are_counted_per_direction(tmp_path: Path) -> None:
    out = tmp_path / "overlap.json"
    assert main(["--model", "toy", "--layers", "2", "--dtype", "float32", "--batch", "2",
                 "--prompt", "8", "--steps", "4", "--swap-mib", "0.0625", "--idle-swaps", "2",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {phase: len(s) for phase, s in result["step_seconds"].items()} == {"quiet": 4,
                                                                              "busy": 4}
    assert result["swap_bytes"] == 2**16 == result["swap_blocks"] * result["block_bytes"]
    for phase in ("copies_while_decoding", "copies_alone"):
        for report in result[phase].values():
            assert report["swaps"] >= 1 and report["gbps"] > 0
            assert report["bytes"] == report["swaps"] * result["swap_bytes"]
    assert all(r["swaps"] >= 2 for r in result["copies_alone"].values())
    assert result["busy_over_quiet"] == pytest.approx(
        result["busy_step_median_s"] / result["quiet_step_median_s"]
    )
