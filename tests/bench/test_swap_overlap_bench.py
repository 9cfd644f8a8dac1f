"""The swap-overlap benchmark on the CPU backend and a tiny model: both phases run, the busy
one with swaps completing all along, and the JSON reports the ratio it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.swap_overlap import main


def test_both_phases_run_and_the_busy_one_moves_bytes(tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "overlap.json"
    assert main(["--checkpoint", str(checkpoint), "--batch", "2", "--prompt", "8",
                 "--steps", "4", "--swap-blocks", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {phase: len(s) for phase, s in result["step_seconds"].items()} == {"quiet": 4,
                                                                              "busy": 4}
    assert result["busy_swaps_done"] >= 2  # at least the first of each direction
    assert result["busy_swap_bytes"] == result["busy_swaps_done"] * 2 * result["block_bytes"]
    assert result["busy_over_quiet"] == pytest.approx(
        result["busy_step_median_s"] / result["quiet_step_median_s"]
    )
