"""A log of the steps the scheduler completed, for calibrating the simulator on a real run.

One JSON line per completed step: its iteration, each sequence's `[start, new tokens]` and
the executor's own time for it (`StepResponse.duration_s`). `benchmarks/sim_vs_real.py`
fits its step model on these steps, so that the simulator steps at the run's own shape and
speed: on shared cores the speed changes by the minute, and a calibration run before it cannot
know. Written line by line, so that a scheduler stopped by a signal leaves whole lines (one
killed mid-write may leave a partial last line, which the reader skips). A log that cannot be
opened stops the scheduler before it starts; one that fails later (a full disk) is given up
with one warning, never the steps it would have recorded.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from services.scheduler.core.plan import StepPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoggedStep:
    iteration: int
    batch: tuple[tuple[int, int], ...]  # (start, new tokens) per sequence
    duration_s: float


class StepLog:
    """Appends to `path` (raises OSError if it cannot be opened); call `close` when done."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        if self._file.tell() and not _ends_a_line(self.path):  # a killed scheduler's partial
            self._file.write("\n")                            # line ends here, not in ours

    def record(self, plan: StepPlan, duration_s: float) -> None:
        if self._file.closed:
            return
        try:
            self._file.write(json.dumps({
                "iteration": plan.iteration,
                "batch": [[s.start, s.num_tokens] for s in plan.batch],
                "duration_s": duration_s,
            }) + "\n")
        except OSError as e:
            log.warning("step log %s: %s; no more steps are logged", self.path, e)
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # what was buffered is lost, the steps are not
            self._file.close()


def _ends_a_line(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def read_step_log(path: str | Path) -> list[LoggedStep]:
    """The steps logged at `path`, in the order they completed. A partial line, from a
    scheduler killed mid-write (the last line, or one a later scheduler wrote after), is
    left out."""
    steps = []
    for line in Path(path).read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            row = None
        if row is not None:
            steps.append(LoggedStep(row["iteration"], tuple((s, n) for s, n in row["batch"]),
                                    row["duration_s"]))
    return steps
