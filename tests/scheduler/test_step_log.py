"""The step log's failures: a path that cannot be opened stops the scheduler before it starts,
a write that fails gives the log up with one warning (never the step), and a partial line,
from a scheduler killed mid-write, is left out when read, also once another has appended."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.scheduler.__main__ import open_step_log
from services.scheduler.core.plan import ScheduledSeq, StepPlan
from services.scheduler.step_log import LoggedStep, StepLog, read_step_log


def plan(iteration: int) -> StepPlan:
    seq = ScheduledSeq("r", block_table=(0,), start=iteration, token_ids=(1,), sample=True)
    return StepPlan(iteration=iteration, batch=(seq,), swaps=(), preemptions=(), host_ops=(),
                    barrier=False)


def test_a_path_that_cannot_be_opened_stops_the_scheduler_with_its_reason(
    tmp_path: Path,
) -> None:
    with pytest.raises(SystemExit, match=r"--step-log .*missing/steps.jsonl: No such file"):
        open_step_log(str(tmp_path / "missing" / "steps.jsonl"))
    assert open_step_log("") is None


def test_a_failing_write_gives_the_log_up_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = StepLog("/dev/full")  # every write fails with ENOSPC
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            log.record(plan(i), 0.01)
    assert [r.getMessage() for r in caplog.records if "no more steps" in r.getMessage()] == [
        "step log /dev/full: [Errno 28] No space left on device; no more steps are logged"]
    log.close()


def test_a_partial_last_line_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "steps.jsonl"
    log = StepLog(path)
    log.record(plan(7), 0.5)
    log.close()
    with path.open("a") as f:
        f.write('{"iteration": 8, "batch": [[8,')
    assert read_step_log(path) == [LoggedStep(7, ((7, 1),), 0.5)]
    again = StepLog(path)  # a restarted scheduler appends after the partial line
    again.record(plan(9), 0.25)
    again.close()
    assert read_step_log(path) == [LoggedStep(7, ((7, 1),), 0.5), LoggedStep(9, ((9, 1),), 0.25)]
