"""Builds the SmolLM2-135M-Instruct test checkpoint (services/executor/model/smollm2.py).

    python -m tools.smollm2_checkpoint [--cache DIR]   # prints the folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.executor.model.smollm2 import SmolLM2Unavailable, smollm2_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.smollm2_checkpoint",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help="where to write the folder [default: $FASTSWITCH_CACHE or "
                             "~/.cache/fastswitch]")
    args = parser.parse_args(argv)
    try:
        print(smollm2_checkpoint(args.cache), flush=True)
    except SmolLM2Unavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
