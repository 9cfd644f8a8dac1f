"""Fails when a generated stub under protos/ is missing or differs from a fresh protoc run."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    protos = sorted(p.relative_to(ROOT) for p in (ROOT / "protos").glob("*.proto"))
    if not protos:
        print("proto-check: no .proto files")
        return 0
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={out}",
             f"--pyi_out={out}", f"--grpc_python_out={out}", *map(str, protos)],
            cwd=ROOT, check=True,
        )
        stale = [
            str(fresh.relative_to(out))
            for fresh in sorted(Path(out).rglob("*.py*"))
            if not (ROOT / fresh.relative_to(out)).exists()
            or not filecmp.cmp(fresh, ROOT / fresh.relative_to(out), shallow=False)
        ]
    if stale:
        print("proto-check: stale generated stubs, run `make proto`:", *stale, sep="\n  ")
        return 1
    print(f"proto-check: {len(protos)} proto file(s) fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
