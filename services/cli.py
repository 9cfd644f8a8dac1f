"""The `fastswitch` command: `fastswitch up` starts the local stack."""

from __future__ import annotations

import sys

from services import launch


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "up":
        print("usage: fastswitch up [--help]", file=sys.stderr)
        return 2
    return launch.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
