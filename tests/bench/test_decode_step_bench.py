"""The decode-step benchmark's dry run (CPU, toy sizes, ops counted on fake CUDA tensors):
every key, and the issue's bounds on this CPU: ops per decode step grow by at most 10% from
the smallest batch to the largest, and a step syncs with the host at most once. Also the
counter's idea of a host sync, and the on-device count path run on a CPU engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.decode_step import (
    DRY_RUN,
    Shape,
    StepCounter,
    build_model,
    count_step,
    main,
    make_engine,
)
from benchmarks.random_model import CUDA

REPO = Path(__file__).resolve().parents[2]
TOP = {"device", "model", "dtype", "layers", "invariant", "dry_run", "steps", "warmup",
       "block_size", "ops_counted_on", "weight_bytes", "bandwidth_gbps", "torch",
       "load_average", "results", "ops_growth", "max_host_syncs", "goals"}
ROW = {"batch", "context", "ms_per_step", "begin_ms_per_step", "ops_per_step",
       "host_syncs_per_step", "roofline_fraction", "hf_ms_per_step", "over_hf", "skipped",
       "error", "hf_skipped"}
GOALS = {"roofline_batch1", "roofline_batch64", "over_hf_batch32"}


def _check(result: dict[str, object], model: str) -> None:
    assert set(result) == TOP
    assert (result["model"], result["device"], result["dry_run"]) == (model, "cpu", True)
    assert result["ops_counted_on"] == "fake cuda"
    rows = result["results"]
    assert isinstance(rows, list)
    assert [(r["batch"], r["context"]) for r in rows] == [(b, c) for c in DRY_RUN["context"]
                                                          for b in DRY_RUN["batch"]]
    for row in rows:
        assert set(row) == ROW
        assert (row["skipped"], row["error"], row["hf_skipped"]) == (None, None, None), row
        assert row["ms_per_step"] > 0 and row["hf_ms_per_step"] is not None
        assert row["over_hf"] == pytest.approx(row["hf_ms_per_step"] / row["ms_per_step"])
        assert row["ops_per_step"] > 0 and row["roofline_fraction"] > 0
    assert result["ops_growth"] == pytest.approx(rows[-1]["ops_per_step"] / rows[0]["ops_per_step"])
    assert result["ops_growth"] <= 1.10
    assert result["max_host_syncs"] <= 1
    goals = result["goals"]
    assert isinstance(goals, dict) and set(goals) == GOALS
    assert goals["roofline_batch1"] == rows[0]["roofline_fraction"]
    assert goals["roofline_batch64"] is None and goals["over_hf_batch32"] is None


def test_the_dry_run_writes_every_key_within_the_issue_s_bounds(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "decode.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode_step", "--dry-run", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )
    _check(json.loads(out.read_text()), "tiny")
    assert "batch    4 context    32" in done.stderr and "ops_growth" in done.stdout


def test_the_llama_path_dry_runs_on_a_toy_of_its_shape(tmp_path: Path) -> None:
    out = tmp_path / "decode.json"
    assert main(["--model", "llama3-8b", "--dry-run", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    _check(result, "llama3-8b")
    assert result["layers"] == 2


def test_host_syncs_are_reads_of_device_data() -> None:
    with FakeTensorMode(allow_non_fake_inputs=True):
        device = torch.zeros(4, device=CUDA)
        with StepCounter() as counter:
            device.cpu()  # a copy to the host
            torch.zeros(4).copy_(device)  # likewise
            torch.zeros(4).to(CUDA)  # to the device: no wait
            device.add(1)
    assert (counter.ops, counter.host_syncs) == (6, 2)  # zeros x2, _to_copy x2, copy_, add
    with StepCounter() as counter:
        torch.ones(2).sum().item()
    assert counter.host_syncs == 1


def test_the_on_device_count_collects_the_step() -> None:
    config, model = build_model("tiny", layers=None, positions=64, dtype=torch.float32,
                                device=torch.device("cpu"), invariant=False, dry_run=True)
    shape = Shape(batch=2, context=16, positions=17)
    engine = make_engine(config, model, shape)
    counter = count_step(engine, shape.step(shape.tables(), 0, [5, 6]), collect=True)
    assert counter.ops > 0 and counter.host_syncs == 0  # nothing crosses from a device
    # The step was collected: two more may be begun, a running one and one queued behind it.
    engine.begin_step(shape.step(shape.tables(), 0, [5, 6]))
    engine.begin_step(shape.step(shape.tables(), 0, [5, 6]))
