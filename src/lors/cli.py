"""The `lors` command: a thin dispatcher over the modules in `lors.commands`.

Each command module exposes `register(subparsers)`, which adds its sub-command and sets
`func` on the parsed arguments. Every sub-command parses its arguments intermixed, so
``key=value`` overrides may come before, between or after flags
(``lors detect train --config tiny a=1 --no-eval b=2``).
"""
from __future__ import annotations

import argparse
import sys

from lors.commands import convert, detect, finetune, lm, params, vit

COMMANDS = (params, detect, lm, vit, finetune, convert)


class IntermixedParser(argparse.ArgumentParser):
    """An ArgumentParser whose leaf commands (those without sub-commands) parse with
    `parse_known_intermixed_args`: positionals (the overrides) may follow any flag.

    argparse refuses intermixed parsing on a parser with sub-commands, so the dispatching
    parsers parse as usual and hand the rest to the leaf, which intermixes; sub-parsers are
    of this class too (``add_subparsers`` makes them of the parent's class).
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        is_leaf = not any(a.nargs == argparse.PARSER for a in self._get_positional_actions())
        if not is_leaf or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = IntermixedParser(
        prog="lors", description="Parameter-efficient network stacking with low-rank residuals.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input, a full disk: one clear line, no traceback
        print(f"lors {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what was saved has been named by the command itself
        print(f"lors {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
