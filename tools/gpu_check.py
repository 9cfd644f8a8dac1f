"""`make gpu-check OUT=DIR`: the GPU path end to end on an offline accelerator machine.

Contract:
- Exits 2 at once, with one line on stderr and nothing written, when torch sees no CUDA
  device (or torch is missing): this is not an accelerator machine.
- Otherwise installs the carried pure-Python wheels (`make gpu-wheels`) offline into a
  scratch folder put first on PYTHONPATH, filling in only what the machine lacks or has
  older; nothing else is installed, and the project runs from the tree. (A folder on
  PYTHONPATH rather than a `--system-site-packages` venv: a venv made from a venv does not
  see the outer venv's packages, and the machine's torch may live in one.)
- Then runs, each step with its own timeout, all within `--budget-s` (default 450 s): the
  CuPy copy-engine and executor-engine tests; `benchmarks/swap_copy.py --backend cupy` for
  LLaMA-3-8B's KV geometry in both directions; `benchmarks/swap_overlap.py` and
  `benchmarks/stack.py --backend cupy` on the tiny model, and on SmolLM2 in bf16 when
  `--smollm2 DIR` names its folder.
- Writes DIR/gpu_check.json, DIR/summary.txt, each step's JSON and DIR/logs/<step>.log.
  Goals are reported, not asserted. Exits 0 when every step ran and passed, 1 otherwise.

Only the standard library is imported up front, so the script runs on the machine's own
interpreter before anything is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WHEELS = REPO / "gpu" / "wheels"
NO_CUDA_EXIT = 2
# Imported in the prepared environment before any step: what the steps need at run time.
MODULES = (
    "torch", "cupy", "numpy", "grpc", "google.protobuf", "grpc_health.v1.health_pb2",
    "grpc_reflection.v1alpha.reflection", "redis", "uvloop", "prometheus_client",
    "safetensors", "tokenizers", "jinja2", "pytest", "pytest_asyncio", "protos.executor_pb2",
)
# LLaMA-3-8B: 32 layers, 8 KV heads, head_dim 128, fp16, 16-token blocks (swap_copy's
# defaults, spelled out so that the record names them).
LLAMA3_8B = ("--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--block-size", "16")
# Skipped by design where CUDA is present; any other skip in the tests step is a failure.
SKIPPED_WITH_CUDA = frozenset({"test_cupy_backend_fails_fast_without_cuda"})
GOALS = {  # name: (description, at least (True) or at most (False), bound)
    "group_over_memcpy": ("group copy over one pinned memcpy", True, 0.8),
    "group_over_per_block": ("group copy over vLLM's layer-major per-block", True, 3.0),
    "busy_over_quiet": ("executor step time with swaps in flight over without", False, 1.10),
}


def cuda_or_exit() -> str:
    """The CUDA device's name, or exit NO_CUDA_EXIT with one line on stderr."""
    try:
        import torch
    except ImportError as exc:
        sys.exit(_no_cuda(f"torch is not importable ({exc})"))
    if not torch.cuda.is_available():
        sys.exit(_no_cuda(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) "
                          f"sees no CUDA device"))
    return torch.cuda.get_device_name(0)


def _no_cuda(reason: str) -> int:
    print(f"gpu-check: {reason}; nothing to check on this machine", file=sys.stderr)
    return NO_CUDA_EXIT


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "7.36.2rc1" -> (7, 36, 2)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def wheels_to_install(wheels: Sequence[Path]) -> list[Path]:
    """The carried wheels whose distribution this interpreter lacks or has older."""
    chosen = []
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        try:
            present = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            chosen.append(wheel)
            continue
        if _release(present) < _release(version):
            chosen.append(wheel)
    return chosen


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    json_out: Path | None = None  # the step's own result file, read into the record
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    skipped: str = ""  # why the step did not run
    problem: str = ""  # why a step that exited 0 still failed
    result: dict[str, object] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.rc == 0 and not self.skipped and not self.problem

    @property
    def state(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.timed_out:
            return "timed out"
        if self.rc != 0:
            return f"rc {self.rc}"
        return self.problem or "ok"


class Runner:
    """Runs steps one after another under one deadline, logging and echoing their output."""

    def __init__(self, out: Path, env: dict[str, str], budget_s: float) -> None:
        self.out, self.env = out, env
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def say(self, line: str) -> None:
        print(f"[gpu-check {time.monotonic() - self.started:5.0f}s] {line}", flush=True)

    def run(self, step: Step) -> Step:
        timeout = min(step.timeout_s, self.deadline - time.monotonic())
        if timeout < 15:
            step.skipped = "the run's time budget is spent"
            self.say(f"{step.name}: {step.state}")
            return step
        self.say(f"{step.name}: {' '.join(step.command)} (timeout {timeout:.0f}s)")
        log_path = self.out / "logs" / f"{step.name}.log"
        t0 = time.monotonic()
        with log_path.open("w") as log:
            # Its own session, so a timeout kills the step's children too (the stack's).
            process = subprocess.Popen(
                step.command, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )
            echo = threading.Thread(target=self._echo, args=(step.name, process, log))
            echo.start()
            try:
                step.rc = process.wait(timeout)
            except subprocess.TimeoutExpired:
                step.timed_out = True
            with contextlib.suppress(ProcessLookupError):  # the session is already empty
                os.killpg(process.pid, signal.SIGKILL)  # what the step left behind, or all
            step.rc = process.wait()
            echo.join()
        step.seconds = time.monotonic() - t0
        if step.json_out is not None and step.json_out.is_file():
            step.result = json.loads(step.json_out.read_text())
        self.say(f"{step.name}: {step.state} in {step.seconds:.0f}s")
        return step

    @staticmethod
    def _echo(name: str, process: subprocess.Popen[str], log: TextIO) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            print(f"  {name}| {line}", end="", flush=True)


def prepare(wheels_dir: Path, scratch: Path, runner: Runner) -> list[Step]:
    """Installs the needed carried wheels into `scratch/site` (already on the runner's
    PYTHONPATH), then imports every module the steps need there; stops at a failure."""
    wheels = sorted(wheels_dir.glob("*.whl"))
    needed = wheels_to_install(wheels)
    if not wheels:
        runner.say(f"no carried wheels in {wheels_dir} (run `make gpu-wheels` where there is "
                   f"a network, and carry that folder); using only what is installed")
    runner.say(f"{len(wheels)} carried wheels; installing {[w.name for w in needed]}")
    site = scratch / "site"
    site.mkdir(parents=True, exist_ok=True)
    steps = []
    if needed:
        steps.append(runner.run(Step("install", [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-index", "--no-deps", "--find-links", str(wheels_dir), "--target", str(site),
            *map(str, needed),
        ], 120)))
        if not steps[-1].passed:
            return steps
    # CuPy links the CUDA runtime statically: these calls need only the driver.
    probe = (
        "import importlib, json, sys\n"
        f"names = {list(MODULES)!r}\n"
        "found = {n: getattr(importlib.import_module(n), '__version__', 'ok') for n in names}\n"
        "import cupy, torch\n"
        "runtime = cupy.cuda.runtime\n"
        "found.update(torch_cuda=torch.version.cuda, cuda_runtime=runtime.runtimeGetVersion(),\n"
        "             cuda_driver=runtime.driverGetVersion(), devices=runtime.getDeviceCount())\n"
        "json.dump(found, open(sys.argv[1], 'w'))\n"
    )
    versions = runner.out / "modules.json"
    steps.append(runner.run(Step("imports", [sys.executable, "-c", probe, str(versions)], 60,
                                 json_out=versions)))
    return steps


def plan(out: Path, smollm2: Path | None) -> list[Step]:
    """Every step after `prepare`, most important first (the budget may cut the tail)."""
    py = sys.executable
    steps = [
        Step("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       f"--junitxml={out / 'tests.xml'}",
                       "tests/executor/test_copy_engine_cupy.py",
                       "tests/executor/test_executor_engine.py"], 150),
        Step("swap_copy", [py, "benchmarks/swap_copy.py", "--backend", "cupy", *LLAMA3_8B,
                           "--tokens", "2048", "--group", "16", "--repeats", "11",
                           "--direction", "both", "--json", str(out / "swap_copy.json")],
             120, json_out=out / "swap_copy.json"),
    ]
    models = [("tiny", [])]
    if smollm2 is not None:
        models.append(("smollm2", ["--checkpoint", str(smollm2), "--dtype", "bfloat16"]))
    for model, flags in models:
        overlap, stack = out / f"swap_overlap_{model}.json", out / f"stack_{model}.json"
        steps += [
            Step(f"swap_overlap_{model}", [py, "-m", "benchmarks.swap_overlap", "--backend",
                                           "cupy", *flags, "--json", str(overlap)],
                 90, json_out=overlap),
            Step(f"stack_{model}", [py, "-m", "benchmarks.stack", "--backend", "cupy", *flags,
                                    "--json", str(stack)], 150, json_out=stack),
        ]
    return steps


def junit_report(path: Path) -> dict[str, object]:
    """Counts over every suite of a JUnit XML file, and the names of the skipped tests."""
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    report: dict[str, object] = {
        k: sum(int(s.get(k, 0)) for s in suites)
        for k in ("tests", "failures", "errors", "skipped")
    }
    report["skipped_tests"] = sorted(
        case.get("name", "") for case in root.iter("testcase") if case.find("skipped") is not None
    )
    return report


def check_skips(step: Step, report: dict[str, object]) -> None:
    """Fails a tests step that skipped a CUDA test: on this machine none may skip."""
    unexpected = sorted(set(report.get("skipped_tests", [])) - SKIPPED_WITH_CUDA)  # type: ignore[arg-type]
    if unexpected:
        step.problem = f"skipped {', '.join(unexpected)}"


def goals(steps: dict[str, Step]) -> list[dict[str, object]]:
    """Each goal against each measurement that bears on it (one per direction or model)."""
    measured: list[tuple[str, str, float]] = []
    for direction, report in steps["swap_copy"].result.get("directions", {}).items():  # type: ignore[union-attr]
        for key in ("group_over_memcpy", "group_over_per_block"):
            measured.append((key, f"swap-{direction}", report[key]))
    for name, step in steps.items():
        if name.startswith("swap_overlap_") and "busy_over_quiet" in step.result:
            measured.append(("busy_over_quiet", name.removeprefix("swap_overlap_"),
                             step.result["busy_over_quiet"]))  # type: ignore[arg-type]
    rows = []
    for key, where, value in measured:
        text, at_least, bound = GOALS[key]
        met = value >= bound if at_least else value <= bound
        rows.append({"goal": key, "what": text, "where": where, "value": value,
                     "bound": f"{'>=' if at_least else '<='} {bound}", "met": met})
    return rows


def summary(record: dict[str, object], steps: dict[str, Step]) -> str:
    lines = [f"gpu-check on {record['device']}: {'PASS' if record['passed'] else 'FAIL'} "
             f"in {record['seconds']:.0f}s (python {platform.python_version()})"]
    for step in steps.values():
        lines.append(f"  {step.name:22} {step.state:12} {step.seconds:6.0f}s")
    if record["tests"]:
        lines.append(f"tests: {record['tests']}")
    copy = steps.get("swap_copy")
    for direction, report in (copy.result.get("directions", {}) if copy else {}).items():  # type: ignore[union-attr]
        ways = "  ".join(f"{way} {report[f'{way}_gbps']:.1f}" for way in
                         ("per_block", "block_major", "group", "memcpy"))
        lines.append(f"swap-{direction} GB/s: {ways}")
    for name, step in steps.items():
        if name.startswith("stack_") and step.result:
            lines.append(f"{name}: identical tokens across modes: "
                         f"{step.result.get('identical_tokens')}")
    for row in record["goals"]:  # type: ignore[attr-defined]
        lines.append(f"goal {row['goal']} ({row['where']}): {row['value']:.3f} {row['bound']} "
                     f"-> {'met' if row['met'] else 'NOT met'}")
    lines.extend(f"note: {note}" for note in record["notes"])  # type: ignore[attr-defined]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the JSON, the summary and logs")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS,
                        help="the carried wheels (make gpu-wheels)")
    parser.add_argument("--smollm2", type=Path,
                        help="a SmolLM2 HF folder (python -m tools.smollm2_checkpoint)")
    parser.add_argument("--budget-s", type=float, default=450, help="the whole run, at most")
    args = parser.parse_args(argv)
    device = cuda_or_exit()
    if args.smollm2 is not None and not (args.smollm2 / "config.json").is_file():
        parser.error(f"--smollm2 {args.smollm2} has no config.json")
    args.out.mkdir(parents=True, exist_ok=True)
    notes = []
    if args.smollm2 is None:
        notes.append("SmolLM2 skipped: no --smollm2 DIR given (its folder is ~540 MB, too "
                     "large to carry to the machine)")
    with tempfile.TemporaryDirectory(prefix="fastswitch-gpu-check-") as scratch:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(Path(scratch) / "site"), str(REPO)]),
            "PYTHONUNBUFFERED": "1",
            "FASTSWITCH_CACHE": str(Path(scratch) / "cache"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        runner = Runner(args.out, env, args.budget_s)
        runner.say(f"CUDA device: {device}; budget {args.budget_s:.0f}s; results in {args.out}")
        steps = {s.name: s for s in prepare(args.wheels, Path(scratch), runner)}
        last = list(steps.values())[-1]
        if last.passed:
            steps.update((s.name, runner.run(s)) for s in plan(args.out, args.smollm2))
        else:
            notes.append(f"stopped after {last.name}: see logs/{last.name}.log")
    tests = junit_report(args.out / "tests.xml")
    if "tests" in steps:
        check_skips(steps["tests"], tests)
    record: dict[str, object] = {
        "device": device,
        "python": platform.python_version(),
        "seconds": time.monotonic() - runner.started,
        "budget_s": args.budget_s,
        "modules": steps["imports"].result if "imports" in steps else {},
        "tests": tests,
        "steps": {name: {k: v for k, v in asdict(s).items() if k != "result"}
                  for name, s in steps.items()},
        "results": {name: s.result for name, s in steps.items() if s.result},
        "notes": notes,
    }
    record["passed"] = all(s.passed for s in steps.values())
    record["goals"] = goals(steps) if "swap_copy" in steps else []
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    text = summary(record, steps)
    (args.out / "summary.txt").write_text(text)
    print(text, end="")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
