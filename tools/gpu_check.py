"""`make gpu-check OUT=DIR`: the paper's claims on an offline accelerator machine, within
`--budget-s` (240 s) from start to the last file; `--dry-run` runs the same steps on a CPU.

Contract:
- Without `--dry-run`: exits 2 at once, with one line on stderr and nothing written, when
  torch sees no CUDA device (or torch is missing): this is not an accelerator machine.
- Loads offline. The carried wheels (`make gpu-wheels`: pure-Python ones and the cp312
  grpcio) that this interpreter lacks or has older are unpacked into a scratch folder put
  first on PYTHONPATH; nothing else is installed, and the project runs from the tree. Steps
  run with `PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python` (an older compiled protobuf on the
  machine cannot load under the carried one) and `PYTEST_DISABLE_PLUGIN_AUTOLOAD=1` (the
  tests step names the plugins it needs). The first step imports every module the others
  need, the `*_pb2_grpc` stubs first; the others run only if it passed.
- Sizes the shared-memory arenas (overlap's swaps, the stack's host blocks) to what
  /dev/shm has free.
- Runs `STEPS` in order, the most important first, each within its own bound and all
  within the budget. A step the budget leaves no time for, or cuts short, is skipped, not
  failed.
- Writes DIR/gpu_check.json and DIR/summary.txt and nothing else; each step's output tail
  is in the JSON. Goals are reported, not asserted. Exits 0 when no step failed, else 1.

`--dry-run`: no CUDA device needed and nothing unpacked. Every step runs on this CPU at toy
sizes (the CPU backends; the correctness and decode scripts' own `--dry-run`) and the JSON
has the same keys, with `"dry_run": true`: its figures are no GPU's.

Only the standard library is imported up front, so the script runs on the machine's own
interpreter before anything is unpacked.
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
import zipfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WHEELS = REPO / "gpu" / "wheels"
NO_CUDA_EXIT = 2
DEFAULT_BUDGET_S = 240.0
WRITE_RESERVE_S = 3.0  # of the budget, kept for writing the record
MIN_STEP_S = 8.0  # a step with less time than this left is skipped
# A dry run's bounds and budget are this many times the device's: it proves that every
# step runs on a CPU that is slower and may be shared (a test suite beside it), not how fast.
DRY_RUN_SLACK = 4.0
TAIL_LINES = 40  # of each step's output, kept in the JSON
# name: bound in seconds, in the order they run. The bounds add up to what the default
# budget leaves after start-up (torch's import for the CUDA check, unpacking: ~5 s).
STEPS: dict[str, float] = {
    "imports": 20,
    "correctness": 35,
    "decode": 55,
    "copies": 25,
    "overlap": 35,
    "stack": 45,
    "tests": 20,
}
# Imported by the first step, in this order: the gRPC stubs first (they check grpcio's and
# protobuf's versions at import), then what the other steps need at run time.
MODULES = (
    "protos.executor_pb2_grpc", "protos.scheduler_pb2_grpc", "protos.kvstore_pb2_grpc",
    "grpc", "google.protobuf", "grpc_health.v1.health_pb2",
    "grpc_reflection.v1alpha.reflection", "redis", "uvloop", "prometheus_client",
    "safetensors", "tokenizers", "jinja2", "numpy", "torch", "pytest", "pytest_asyncio.plugin",
)
CUDA_MODULES = ("cupy",)  # not in a dry run
PYTEST_PLUGINS = ("pytest_asyncio.plugin",)  # loaded by name: autoload is off
# LLaMA-3-8B's KV: 32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks.
LLAMA3_8B_KV = ("--layers", "32", "--kv-heads", "8", "--head-dim", "128", "--block-size", "16",
                "--dtype", "bfloat16")
TOY_KV = ("--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--block-size", "4")
COPY_GROUPS = "1,2,4,8,16,32"
SHM = Path("/dev/shm")
SHM_USE = 0.8  # of /dev/shm's free bytes, for the one arena a step holds at a time
OVERLAP_SWAP_MIB = {False: 128.0, True: 0.25}  # by dry run; its arena holds two swaps
STACK_HOST_BLOCKS = {False: 2048, True: 256}  # benchmarks/stack.py's default, and a toy
TINY_BLOCK_BYTES = 32 * 1024  # the tiny model's KV block: 4 layers x K/V x 16 x 2 x 32 x fp32
# Skipped by design where CUDA is present; any other skip in the tests step is a failure.
SKIPPED_WITH_CUDA = frozenset({"test_cupy_backend_fails_fast_without_cuda"})
GOALS = {  # name: (description, at least (True) or at most (False), bound)
    "roofline_batch1": ("decode step's fraction of the memory roofline, batch 1", True, 0.7),
    "roofline_batch64": ("decode step's fraction of the memory roofline, batch 64, 1k context",
                         True, 0.5),
    "over_hf_batch32": ("decode speed over HF generate, batch 32", True, 1.5),
    "group_over_memcpy": ("group copy over one pinned memcpy", True, 0.8),
    "group_over_per_block": ("group copy over vLLM's layer-major per-block", True, 3.0),
    "busy_over_quiet": ("decode step time with 128 MiB swaps in flight over without", False,
                        1.10),
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
    print(f"gpu-check: {reason}; nothing to check on this machine (--dry-run runs the steps "
          f"on the CPU)", file=sys.stderr)
    return NO_CUDA_EXIT


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "7.36.2rc1" -> (7, 36, 2)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def wheels_to_install(wheels: Sequence[Path]) -> list[Path]:
    """The carried wheels for this interpreter (pure Python, or its own CPython tag) whose
    distribution it lacks or has older."""
    ours = f"cp{sys.version_info.major}{sys.version_info.minor}"
    chosen = []
    for wheel in wheels:
        name, version, python_tag = wheel.name.split("-")[:3]
        if python_tag.startswith("cp") and python_tag != ours:
            continue
        try:
            present = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            chosen.append(wheel)
            continue
        if _release(present) < _release(version):
            chosen.append(wheel)
    return chosen


def unpack_wheels(wheels: Sequence[Path], site: Path) -> None:
    """Installs wheels by unpacking them into `site` (a folder on PYTHONPATH): no pip, and
    their metadata comes along, so `importlib.metadata` sees their versions."""
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)


def shm_free_bytes(path: Path = SHM) -> int:
    """Free bytes of the shared-memory filesystem the arenas live in; 0 if there is none."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def fit_to_shm(wanted: float, unit_bytes: float, free_bytes: int) -> float:
    """`wanted` units of `unit_bytes`, or as many as fit in SHM_USE of `free_bytes`."""
    return min(wanted, SHM_USE * free_bytes / unit_bytes)


@dataclass
class Step:
    name: str
    command: list[str]
    bound_s: float
    json_out: Path | None = None  # the step's own result file, read into the record
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    skipped: str = ""  # why the step did not run, or did not finish within the budget
    problem: str = ""  # why a step that exited 0 still failed
    output_tail: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.rc == 0 and not self.skipped and not self.problem

    @property
    def failed(self) -> bool:
        return not self.skipped and not self.passed

    @property
    def state(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.timed_out:
            return f"failed: over its {self.bound_s:g}s bound"
        if self.rc != 0:
            return f"failed: rc {self.rc}"
        return f"failed: {self.problem}" if self.problem else "ok"

    def record(self) -> dict[str, Any]:
        return {"command": self.command, "bound_s": self.bound_s, "seconds": self.seconds,
                "rc": self.rc, "timed_out": self.timed_out, "skipped": self.skipped,
                "problem": self.problem, "state": self.state, "passed": self.passed,
                "output_tail": self.output_tail}


class Runner:
    """Runs steps one after another under one deadline, echoing their output as it comes."""

    def __init__(self, env: dict[str, str], started: float, deadline: float,
                 min_step_s: float = MIN_STEP_S) -> None:
        self.env, self.started, self.deadline = env, started, deadline
        self.min_step_s = min_step_s

    def say(self, line: str) -> None:
        print(f"[gpu-check {time.monotonic() - self.started:5.0f}s] {line}", flush=True)

    def skip(self, step: Step, why: str) -> None:
        step.skipped = why
        self.say(f"{step.name}: {step.state}")

    def run(self, step: Step) -> None:
        left = self.deadline - time.monotonic()
        if left < self.min_step_s:
            self.skip(step, f"{left:.0f}s of the budget left")
            return
        timeout = min(step.bound_s, left)
        self.say(f"{step.name}: {' '.join(step.command)} (timeout {timeout:.0f}s)")
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        t0 = time.monotonic()
        # Its own session, so a timeout kills the step's children too (the stack's).
        process = subprocess.Popen(
            step.command, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )
        echo = threading.Thread(target=self._echo, args=(step.name, process, tail))
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
        step.output_tail = "".join(tail)
        if step.timed_out and timeout < step.bound_s:
            step.skipped = f"the budget ran out after {timeout:.0f}s of its {step.bound_s:.0f}s"
        if step.json_out is not None and step.json_out.is_file():
            step.result = json.loads(step.json_out.read_text())
        self.say(f"{step.name}: {step.state} in {step.seconds:.0f}s")

    @staticmethod
    def _echo(name: str, process: subprocess.Popen[str], tail: deque[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line)
            print(f"  {name}| {line}", end="", flush=True)


def _probe(modules: Sequence[str], cuda: bool) -> str:
    """The imports step's program: imports `modules` in order (the first failure ends it with
    its traceback) and writes their versions, protobuf's backend and, with `cuda`, CuPy's
    view of CUDA to the file named by its argument."""
    return (
        "import importlib, json, sys\n"
        "found = {}\n"
        f"for name in {list(modules)!r}:\n"
        "    found[name] = getattr(importlib.import_module(name), '__version__', 'ok')\n"
        "from google.protobuf.internal import api_implementation\n"
        "found['protobuf_backend'] = api_implementation.Type()\n"
        + ("import cupy, torch\n"
           "runtime = cupy.cuda.runtime\n"  # CuPy links the runtime statically: driver only
           "found.update(torch_cuda=torch.version.cuda, cuda_runtime=runtime.runtimeGetVersion(),"
           "\n             cuda_driver=runtime.driverGetVersion(),"
           " devices=runtime.getDeviceCount())\n" if cuda else "")
        + "json.dump(found, open(sys.argv[1], 'w'))\n"
    )


@dataclass(frozen=True)
class Sizes:
    """What /dev/shm decides: the overlap's swap size and the stack's host blocks."""

    shm_free_bytes: int
    overlap_swap_mib: float
    stack_host_blocks: int

    @classmethod
    def fit(cls, free_bytes: int, dry_run: bool) -> Sizes:
        swap_mib = fit_to_shm(OVERLAP_SWAP_MIB[dry_run], 2 * 2**20, free_bytes)
        host_blocks = fit_to_shm(STACK_HOST_BLOCKS[dry_run], TINY_BLOCK_BYTES, free_bytes)
        return cls(free_bytes, swap_mib, int(host_blocks))

    @property
    def reduced(self) -> bool:
        return (self.overlap_swap_mib < OVERLAP_SWAP_MIB[False]
                or self.stack_host_blocks < STACK_HOST_BLOCKS[False])


def plan(scratch: Path, dry_run: bool, sizes: Sizes) -> list[Step]:
    """Every step of `STEPS`, in order; results go to `scratch`, read into the record."""
    py = sys.executable
    backend = "cpu" if dry_run else "cupy"
    dry = ["--dry-run"] if dry_run else []

    def out(name: str) -> Path:
        return scratch / f"{name}.json"

    commands: dict[str, list[str]] = {
        "imports": [py, "-c", _probe(MODULES if dry_run else MODULES + CUDA_MODULES,
                                     not dry_run), str(out("imports"))],
        "correctness": [py, "-m", "tools.gpu_correctness", *dry, "--json", str(out("correctness"))],
        "decode": [py, "-m", "benchmarks.decode_step", *(dry or [
            "--model", "llama3-8b", "--device", "cuda", "--dtype", "bfloat16",
            "--batch", "1,32,64,128", "--context", "1024", "--hf"]),
            "--json", str(out("decode"))],
        "copies": [py, "benchmarks/swap_copy.py", "--backend", backend,
                   *((*TOY_KV, "--tokens", "128", "--repeats", "2") if dry_run
                     else (*LLAMA3_8B_KV, "--tokens", "2048", "--repeats", "5")),
                   "--groups", COPY_GROUPS, "--ways", "out,in,both", "--headline-group", "16",
                   "--json", str(out("copies"))],
        "overlap": [py, "-m", "benchmarks.swap_overlap", "--backend", backend,
                    *(("--model", "toy", "--layers", "2", "--dtype", "float32", "--batch", "2",
                       "--prompt", "8", "--steps", "3", "--idle-swaps", "2") if dry_run else
                      ("--model", "llama3-8b", "--layers", "4", "--dtype", "bfloat16",
                       "--batch", "32", "--prompt", "512", "--steps", "20")),
                    "--swap-mib", f"{sizes.overlap_swap_mib:g}", "--json", str(out("overlap"))],
        # Dry: one mode, for time; `make demo` and tests/stack hold the modes to equal tokens.
        "stack": [py, "-m", "benchmarks.stack", "--backend", backend,
                  *(("--modes", "fastswitch", "--clients", "1", "--turns", "1")
                    if dry_run else ()),
                  "--host-blocks", str(sizes.stack_host_blocks), "--json", str(out("stack"))],
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  *(arg for plugin in PYTEST_PLUGINS for arg in ("-p", plugin)),
                  f"--junitxml={scratch / 'tests.xml'}", "tests/executor/test_copy_engine_cupy.py",
                  "tests/executor/test_executor_engine.py", "tests/executor/test_cuda_graphs.py",
                  "-k", "cupy or cuda_replayed or cuda_engine or cuda_graphs_asked"],
    }
    slack = DRY_RUN_SLACK if dry_run else 1.0
    return [Step(name, commands[name], bound * slack, out(name) if name != "tests" else None)
            for name, bound in STEPS.items()]


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


def judge(steps: dict[str, Step], scratch: Path, dry_run: bool) -> None:
    """Fails the steps that exited 0 but did not do what they claim."""
    tests = steps["tests"]
    tests.result = junit_report(scratch / "tests.xml")
    if tests.passed and not dry_run:
        check_skips(tests, tests.result)
    for step in steps.values():
        if not step.passed:
            continue
        if step.json_out is not None and not step.result:
            step.problem = f"wrote no {step.json_out.name}"
        elif step.name == "correctness" and step.result.get("passed") is not True:
            failed = [c.get("name") for c in step.result.get("checks", []) if not c.get("passed")]
            step.problem = f"checks failed: {', '.join(map(str, failed)) or 'passed is not true'}"
        elif step.name == "stack" and step.result.get("identical_tokens") is not True:
            step.problem = "the modes returned different tokens"


def goals(results: dict[str, dict[str, Any]]) -> list[dict[str, object]]:
    """Each goal against each measurement that bears on it (copies: one per way, at the
    headline group length); a goal whose step gave no figure has value None."""
    measured: list[tuple[str, str, float | None]] = []
    decode = results.get("decode", {}).get("goals", {})
    measured += [(key, "decode", decode.get(key))
                 for key in ("roofline_batch1", "roofline_batch64", "over_hf_batch32")]
    copies = results.get("copies", {})
    headline = str(copies.get("headline_group"))
    for way in ("out", "in", "both"):
        report = copies.get("directions", {}).get(way, {})
        measured += [(key, f"swap-{way} group_{headline}", report.get(key, {}).get(headline))
                     for key in ("group_over_memcpy", "group_over_per_block")]
    measured.append(("busy_over_quiet", "overlap",
                     results.get("overlap", {}).get("busy_over_quiet")))
    rows = []
    for key, where, value in measured:
        text, at_least, bound = GOALS[key]
        met = None if value is None else (value >= bound if at_least else value <= bound)
        rows.append({"goal": key, "what": text, "where": where, "value": value,
                     "bound": f"{'>=' if at_least else '<='} {bound}", "met": met})
    return rows


def _num(value: object, spec: str = ".2f") -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def summary(record: dict[str, Any]) -> str:
    """The record's verdict and headline figures, a screen's worth."""
    results: dict[str, dict[str, Any]] = record["results"]
    dry = " DRY RUN (CPU, toy sizes: no GPU figures)" if record["dry_run"] else ""
    lines = [f"gpu-check on {record['device']}:{dry} {'PASS' if record['passed'] else 'FAIL'} "
             f"in {record['seconds']:.0f}s of a {record['budget_s']:.0f}s budget "
             f"(python {record['python']})"]
    lines += [f"  {name:12} {step['seconds']:5.0f}s  {step['state']}"
              for name, step in record["steps"].items()]
    correctness = results.get("correctness", {})
    if correctness:
        checks = correctness.get("checks", [])
        worst = max((c.get("max_abs_diff") or 0 for c in checks), default=None)
        lines.append(f"correctness: {sum(bool(c.get('passed')) for c in checks)}/{len(checks)} "
                     f"checks passed; worst max_abs_diff {_num(worst, '.3g')}")
    for row in results.get("decode", {}).get("results", []):
        lines.append(f"decode batch {row.get('batch')} ctx {row.get('context')}: "
                     f"{_num(row.get('ms_per_step'))} ms/step, roofline "
                     f"{_num(row.get('roofline_fraction'))}, HF {_num(row.get('hf_ms_per_step'))} "
                     f"ms ({_num(row.get('over_hf'))}x), {row.get('ops_per_step')} ops, "
                     f"{row.get('host_syncs_per_step')} syncs")
    copies = results.get("copies", {})
    headline = str(copies.get("headline_group"))
    for way, report in copies.get("directions", {}).items():
        lines.append(f"swap-{way} GB/s: per_block {_num(report['per_block_gbps'])}  block_major "
                     f"{_num(report['block_major_gbps'])}  group_{headline} "
                     f"{_num(report['group_gbps'].get(headline))}  memcpy "
                     f"{_num(report['memcpy_gbps'])}")
    if copies:
        lines.append(f"context switch (one request out, one in): layer-major per block takes "
                     f"{_num(copies.get('context_switch_ratio'))}x group_{headline}'s time")
    overlap = results.get("overlap", {})
    if overlap:
        gbps = {phase: ", ".join(f"{d} {_num(r.get('gbps'))}" for d, r in overlap[phase].items())
                for phase in ("copies_while_decoding", "copies_alone")}
        lines.append(f"overlap: step {_num(overlap['quiet_step_median_s'] * 1e3)} ms quiet, "
                     f"{_num(overlap['busy_step_median_s'] * 1e3)} ms with swaps; copy GB/s "
                     f"while decoding {gbps['copies_while_decoding']}, alone "
                     f"{gbps['copies_alone']}")
    stack = results.get("stack", {})
    if stack:
        lines.append(f"stack: identical tokens across modes: {stack.get('identical_tokens')}")
        lines.append(stack.get("table", ""))
    for row in record["goals"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[row["met"]]
        lines.append(f"goal {row['goal']} ({row['where']}): {_num(row['value'], '.3f')} "
                     f"{row['bound']} -> {verdict}")
    lines += [f"note: {note}" for note in record["notes"]]
    return "\n".join(lines) + "\n"


def child_env(scratch: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(scratch / "site"), str(REPO)]),
        "PYTHONUNBUFFERED": "1",
        "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        "FASTSWITCH_CACHE": str(scratch / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and summary.txt")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS,
                        help="the carried wheels (make gpu-wheels)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="the whole run, start-up included, at most")
    parser.add_argument("--dry-run", action="store_true",
                        help="every step on this CPU at toy sizes; no CUDA, nothing unpacked")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.budget_s *= DRY_RUN_SLACK
    device = "cpu (dry run)" if args.dry_run else cuda_or_exit()
    args.out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    wheels = sorted(args.wheels.glob("*.whl"))
    installed = [] if args.dry_run else wheels_to_install(wheels)
    if not wheels and not args.dry_run:
        notes.append(f"no carried wheels in {args.wheels} (`make gpu-wheels` where there is a "
                     f"network, and carry that folder): only what is installed was used")
    sizes = Sizes.fit(shm_free_bytes(), args.dry_run)
    if sizes.reduced and not args.dry_run:
        notes.append(f"/dev/shm has {sizes.shm_free_bytes / 2**20:.0f} MiB free: overlap swaps "
                     f"of {sizes.overlap_swap_mib:.1f} MiB, stack with "
                     f"{sizes.stack_host_blocks} host blocks")
    with tempfile.TemporaryDirectory(prefix="fastswitch-gpu-check-") as scratch_dir:
        scratch = Path(scratch_dir)
        unpack_wheels(installed, scratch / "site")
        runner = Runner(child_env(scratch), started,
                        started + args.budget_s - WRITE_RESERVE_S)
        runner.say(f"{device}; budget {args.budget_s:.0f}s; unpacked "
                   f"{[w.name for w in installed]}; results in {args.out}")
        steps = {step.name: step for step in plan(scratch, args.dry_run, sizes)}
        for step in steps.values():
            if step.name != "imports" and steps["imports"].failed:
                runner.skip(step, "the imports step failed")
            else:
                runner.run(step)
        judge(steps, scratch, args.dry_run)
    record: dict[str, Any] = {
        "dry_run": args.dry_run,
        "device": device,
        "python": platform.python_version(),
        "budget_s": args.budget_s,
        "seconds": time.monotonic() - started,
        "load": {"wheels": len(wheels), "unpacked": [w.name for w in installed]},
        "shm": {"free_bytes": sizes.shm_free_bytes, "overlap_swap_mib": sizes.overlap_swap_mib,
                "stack_host_blocks": sizes.stack_host_blocks},
        "steps": {name: step.record() for name, step in steps.items()},
        "results": {name: step.result for name, step in steps.items()},
        "passed": not any(step.failed for step in steps.values()),
        "notes": notes,
    }
    record["goals"] = goals(record["results"])
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    text = summary(record)
    (args.out / "summary.txt").write_text(text)
    print(text, end="")
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
