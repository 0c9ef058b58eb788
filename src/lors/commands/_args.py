"""Argument types and flag groups that several `lors` sub-commands share."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from dataclasses import dataclass


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


@dataclass(frozen=True)
class FamilyExperiments:
    """What `compare` and `sweep` of a model family need to know (`lors lm`, `lors vit`): its
    name and models as the help says them, its metric, its presets and output folders, and the
    module whose ``compare_<suffix>`` and ``sweep_<suffix>`` run them (imported when a command
    runs, so `lors --help` does not load torch)."""
    family: str         # "GPT", "ViT"
    what: str           # "byte-level GPTs", "ViTs"
    metric: str         # "val bits per byte"
    dense: str
    lors: str
    tied: str
    alloc: str          # the LORS config with ranks allocated by depth (the sweep's extra row)
    widths: tuple[int, ...]
    ranks: tuple[int, ...]
    module: str         # "lors.experiments.lm.compare"
    suffix: str         # "lm": compare_lm, sweep_lm
    out: str            # "runs/lm": runs/lm_compare, runs/lm_sweep

    def function(self, name: str):
        return getattr(importlib.import_module(self.module), f"{name}_{self.suffix}")


def add_family_experiments(cmds, spec: FamilyExperiments) -> None:
    """The `compare` and `sweep` sub-commands of a model family."""
    add_compare_parser(cmds, spec)
    add_sweep_parser(cmds, spec)


def add_compare_parser(cmds, spec: FamilyExperiments) -> argparse.ArgumentParser:
    """The `compare` sub-command of a model family (`lors lm compare`, `lors vit compare`)."""
    what, out = spec.what, f"{spec.out}_compare"
    p = cmds.add_parser("compare", help=f"dense vs LORS vs tied vs dense-small {what}, same budget and seeds",
                        description=f"Train the four models for every seed on the same budget and write a table "
                                    f"({spec.metric}), summary.json and two plots to --out (see docs/lm.md).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="S", help="training seeds (default 0 1)")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--dense", default=spec.dense, help=f"the dense config (default {spec.dense})")
    p.add_argument("--lors", default=spec.lors, help=f"the LORS config (default {spec.lors})")
    p.add_argument("--tied", default=spec.tied, help=f"the tied config (default {spec.tied})")
    p.add_argument("--jobs", type=positive_int, default=None, help="runs at a time (default: cores, at most 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"{spec.family} config overrides for all four models")

    def run(args: argparse.Namespace) -> int:
        spec.function("compare")(seeds=args.seeds, out=args.out, dense=args.dense, lors=args.lors, tied=args.tied,
                                 overrides=args.overrides, jobs=args.jobs, quiet=args.quiet)
        return 0

    p.set_defaults(func=run)
    return p


def add_sweep_parser(cmds, spec: FamilyExperiments) -> argparse.ArgumentParser:
    """The `sweep` sub-command of a model family (`lors lm sweep`, `lors vit sweep`): the
    Pareto front of dense widths against LORS ranks."""
    what, out, widths, ranks, alloc = spec.what, f"{spec.out}_sweep", list(spec.widths), list(spec.ranks), spec.alloc
    p = cmds.add_parser("sweep", help=f"dense {what} at several widths against LORS at several ranks: the Pareto front",
                        description=f"Train dense models at --widths and LORS models at --ranks (and the --alloc "
                                    f"config) for every seed on one budget; write a table ({spec.metric} against "
                                    f"non-embedding parameters and training FLOPs), summary.json and two plots to "
                                    f"--out (see docs/lm.md).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S", help="training seeds (default 0)")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--dense", default=spec.dense, help=f"the dense config (default {spec.dense})")
    p.add_argument("--lors", default=spec.lors, help=f"the LORS config (default {spec.lors})")
    p.add_argument("--widths", type=positive_int, nargs="+", default=widths, metavar="W",
                   help=f"dense widths; must include the LORS config's (default {' '.join(map(str, widths))})")
    p.add_argument("--ranks", type=positive_int, nargs="+", default=ranks, metavar="R",
                   help=f"LORS private ranks (default {' '.join(map(str, ranks))})")
    p.add_argument("--alloc", default=alloc, help=f"a LORS config with ranks allocated by depth, one more row "
                                                  f"(default {alloc}; 'none' for no such row)")
    p.add_argument("--jobs", type=positive_int, default=None, help="runs at a time (default: cores, at most 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"{spec.family} config overrides for every model")

    def run(args: argparse.Namespace) -> int:
        spec.function("sweep")(seeds=args.seeds, out=args.out, dense=args.dense, lors=args.lors, widths=args.widths,
                               ranks=args.ranks, alloc=None if args.alloc == "none" else args.alloc,
                               overrides=args.overrides, jobs=args.jobs, quiet=args.quiet)
        return 0

    p.set_defaults(func=run)
    return p
