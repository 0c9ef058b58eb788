"""Argument types and flag groups that several `lors` sub-commands share."""
from __future__ import annotations

import argparse
import contextlib
import sys


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def json_only(args: argparse.Namespace):
    """With --json, stdout carries the JSON alone: what the work prints (COCOeval's table, a
    run's progress notes) goes to stderr."""
    return contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()


DEVICE_HELP = "cpu, cuda, cuda:N (default: this process's GPU, else CPU)"


def family_parser(sub, name: str, help: str):
    """The sub-parsers of a model family's command (`lors lm`, `lors vit`)."""
    parser = sub.add_parser(name, help=help)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def add_train_parser(cmds, kind: str, what: str, default: str, func, json_help: str) -> argparse.ArgumentParser:
    """The `train` sub-command of a model family (`lors lm train`, `lors vit train`): a preset,
    overrides, the run directory, resume and extend, the device and --json."""
    p = cmds.add_parser("train", help=f"train {what}")
    p.add_argument("--config", default=default, help=f"preset name (lors/configs/{kind}/NAME.yaml) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.add_argument("--run-dir", help="checkpoints and logs (default: train.output_dir)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if run-dir has a checkpoint")
    p.add_argument("--extend", action="store_true", help="let a larger train.steps continue a shorter run")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=func)
    return p


def add_compare_parser(cmds, family: str, what: str, metric: str, dense: str, lors: str, tied: str, out: str,
                       compare) -> argparse.ArgumentParser:
    """The `compare` sub-command of a model family (`lors lm compare`, `lors vit compare`);
    ``compare()`` returns the family's compare function (imported when the command runs)."""
    p = cmds.add_parser("compare", help=f"dense vs LORS vs tied vs dense-small {what}, same budget and seeds",
                        description=f"Train the four models for every seed on the same budget and write a table "
                                    f"({metric}), summary.json and two plots to --out (see docs/lm.md).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="S", help="training seeds (default 0 1)")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--dense", default=dense, help=f"the dense config (default {dense})")
    p.add_argument("--lors", default=lors, help=f"the LORS config (default {lors})")
    p.add_argument("--tied", default=tied, help=f"the tied config (default {tied})")
    p.add_argument("--jobs", type=positive_int, default=None, help="runs at a time (default: cores, at most 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"{family} config overrides for all four models")

    def run(args: argparse.Namespace) -> int:
        compare()(args.seeds, args.out, args.dense, args.lors, args.tied, args.overrides, args.jobs, args.quiet)
        return 0

    p.set_defaults(func=run)
    return p


def add_sweep_parser(cmds, family: str, what: str, metric: str, dense: str, lors: str, alloc: str, widths: list[int],
                     ranks: list[int], out: str, sweep) -> argparse.ArgumentParser:
    """The `sweep` sub-command of a model family (`lors lm sweep`, `lors vit sweep`): the
    Pareto front of dense widths against LORS ranks; ``sweep()`` returns the family's sweep
    function (imported when the command runs)."""
    p = cmds.add_parser("sweep", help=f"dense {what} at several widths against LORS at several ranks: the Pareto front",
                        description=f"Train dense models at --widths and LORS models at --ranks (and the --alloc "
                                    f"config) for every seed on one budget; write a table ({metric} against "
                                    f"non-embedding parameters and training FLOPs), summary.json and two plots to "
                                    f"--out (see docs/lm.md).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S", help="training seeds (default 0)")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--dense", default=dense, help=f"the dense config (default {dense})")
    p.add_argument("--lors", default=lors, help=f"the LORS config (default {lors})")
    p.add_argument("--widths", type=positive_int, nargs="+", default=widths, metavar="W",
                   help=f"dense widths; must include the LORS config's (default {' '.join(map(str, widths))})")
    p.add_argument("--ranks", type=positive_int, nargs="+", default=ranks, metavar="R",
                   help=f"LORS private ranks (default {' '.join(map(str, ranks))})")
    p.add_argument("--alloc", default=alloc, help=f"a LORS config with ranks allocated by depth, one more row "
                                                  f"(default {alloc}; 'none' for no such row)")
    p.add_argument("--jobs", type=positive_int, default=None, help="runs at a time (default: cores, at most 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"{family} config overrides for every model")

    def run(args: argparse.Namespace) -> int:
        sweep()(args.seeds, args.out, args.dense, args.lors, args.widths, args.ranks,
                None if args.alloc == "none" else args.alloc, args.overrides, args.jobs, args.quiet)
        return 0

    p.set_defaults(func=run)
    return p
