"""The `lors` command: a thin dispatcher over the modules in `lors.commands`.

Each command module exposes `register(subparsers)`, which adds its sub-command and sets
`func` on the parsed arguments. Every sub-command parses its arguments intermixed, so
``key=value`` overrides may come before, between or after flags
(``lors detect train --config tiny a=1 --no-eval b=2``).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from lors import __version__
from lors.commands import convert, detect, finetune, lm, params, vit
from lors.engine.loop import NonFiniteLossError

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
    parser.add_argument("--version", action="version", version=f"lors {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


DEBUG = "LORS_DEBUG"  # LORS_DEBUG=1: errors with their traceback, for a bug report


def _warning(message, category, filename, lineno, file=None, line=None) -> str:
    """Warnings of the library (a warm-up longer than the run) as one line, without the source
    line Python would print under them."""
    return f"lors: warning: {message}\n"


def _describe(err: Exception) -> str:
    """One line for an error: an OSError that is not one of lors's own (a full disk while a log
    is written) gets its file and what to check."""
    if isinstance(err, OSError) and not isinstance(err, ValueError):
        where = f" ({err.filename})" if err.filename else ""
        return (f"{err.strerror or err}{where}: check that the path exists, is writable and its disk has "
                "free space, then rerun the same command")
    return str(err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = os.environ.get(DEBUG, "") not in ("", "0")
    python_format = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # what was saved has been named by the command itself
        print(f"lors {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, NonFiniteLossError) as err:
        # bad input, a full disk, a diverged run: one clear line, no traceback (LORS_DEBUG=1 shows it)
        if debug:
            raise
        print(f"lors {args.command}: error: {_describe(err)}", file=sys.stderr)
        return 2
    finally:  # main() called from Python leaves the caller's warning format as it was
        warnings.formatwarning = python_format


if __name__ == "__main__":
    sys.exit(main())
