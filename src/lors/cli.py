"""The `lors` command: a thin dispatcher over the modules in `lors.commands`.

Each command module exposes `register(subparsers)`, which adds its sub-command and sets
`func` on the parsed arguments.
"""
from __future__ import annotations

import argparse
import sys

from lors.commands import detect, finetune, params

COMMANDS = (params, detect, finetune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lors", description="Parameter-efficient network stacking with low-rank residuals.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"lors {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
