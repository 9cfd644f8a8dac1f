"""The swap-copy benchmark on a tiny geometry: its JSON, its copy counts, and its self-check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.swap_copy import Method, measure

REPO = Path(__file__).resolve().parents[1]
LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 2, 4, 2, 8
TOKENS, GROUP, REPEATS = 40, 4, 2  # 10 blocks in groups of 4, 4 and 2


def test_the_script_writes_the_json_the_issue_names(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "swap.json"
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/swap_copy.py",
            *("--tokens", str(TOKENS), "--layers", str(LAYERS), "--group", str(GROUP)),
            *("--block-size", str(BLOCK_SIZE), "--kv-heads", str(KV_HEADS)),
            *("--head-dim", str(HEAD_DIM), "--repeats", str(REPEATS), "--json", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(out.read_text())

    blocks = TOKENS // BLOCK_SIZE
    assert result["bytes"] == TOKENS * LAYERS * 2 * KV_HEADS * HEAD_DIM * 2  # fp16
    assert {name: m["copies"] for name, m in result["methods"].items()} == {
        "per_block": blocks * LAYERS * 2,
        "group": 3,
        "memcpy": 1,
    }
    for name in ("per_block", "group", "memcpy"):
        method = result["methods"][name]
        assert len(method["seconds"]) == REPEATS
        assert result[f"{name}_gbps"] == pytest.approx(method["median_gbps"])
        assert 0 < method["median_gbps"] <= method["best_gbps"]
    assert result["group_over_per_block"] == pytest.approx(
        result["group_gbps"] / result["per_block_gbps"]
    )
    assert result["group_over_memcpy"] == pytest.approx(
        result["group_gbps"] / result["memcpy_gbps"]
    )
    assert f"repeat {REPEATS}/{REPEATS}" in done.stderr
    assert "group/memcpy" in done.stdout


def test_a_method_that_copies_wrong_bytes_fails_the_run() -> None:
    src, dst = torch.arange(64, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint8)

    def copy_all_but_the_last_byte() -> None:
        dst[:-1].copy_(src[:-1])

    sloppy = Method("sloppy", 1, copy_all_but_the_last_byte, lambda: torch.equal(dst, src))
    with pytest.raises(AssertionError, match="sloppy copied the wrong bytes"):
        measure([sloppy], repeats=1)
