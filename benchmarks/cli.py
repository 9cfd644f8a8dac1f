"""What the benchmarks' command lines share."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from services.scheduler.core.config import Mode


def parse_modes(text: str) -> list[Mode]:
    """`--modes`: a comma list of scheduler modes."""
    try:
        modes = [Mode(m.strip()) for m in text.split(",") if m.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{error}; modes are a comma list of {[m.value for m in Mode]}") from None
    if not modes:
        raise argparse.ArgumentTypeError(f"no modes in {text!r}")
    return modes


def comma_ints(text: str) -> list[int]:
    """A comma list of integers, possibly empty."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None


def parse_ints(text: str) -> list[int]:
    """A comma list of positive integers (`--batch 1,8,32`)."""
    values = comma_ints(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive integers")
    return values


def parse_seeds(text: str) -> list[int]:
    """A comma list of distinct integers (`--seeds 0,1,2`)."""
    seeds = comma_ints(text)
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"give distinct seeds, got {text!r}")
    return seeds


def write_json(path: Path, document: Any) -> None:
    """`--json`: the report, indented, in `path` (its folder made if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
