"""Training-step time of a detector config against a variant of it, measured in one run.

Both variants train at the same time, each in its own process with one CPU thread, as
`lors detect compare` runs them on a 2-core machine, on the default digits benchmark
(`runs/bench_data`, built if missing) from random backbone weights (the cost is the same).
Each runs the real training loop (`lors.experiments.detection.train.train`, stopped after
``--steps``, through `lors.experiments.runner`) and reports its median step time (data loading
excluded); the ratio is B / A.

    python benchmarks/bench_detect_step.py                  # bench_adamixer, C2..C5 vs C2..C4
    python benchmarks/bench_detect_step.py --config bench_adamixer_lors --steps 200 \\
        --a backbone.num_levels=4 --b backbone.num_levels=3
"""
from __future__ import annotations

import argparse
import sys
import tempfile


def step_time(config: str, overrides: list[str], steps: int) -> float:
    """Median training-step time of ``config`` + ``overrides`` on the default benchmark."""
    from lors.experiments.detection.bench import data_overrides
    from lors.experiments.detection.train import train
    from lors.models.adamixer import load_detector_config
    cfg = load_detector_config(config, [*data_overrides("runs/bench_data"), "backbone.weights=null", *overrides])
    with tempfile.TemporaryDirectory() as run_dir:
        summary = train(cfg, run_dir, resume=False, progress=False, stop_after=steps, evaluate_at_end=False)
    return summary["seconds_per_step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bench_adamixer")
    parser.add_argument("--a", nargs="*", default=["backbone.num_levels=4"], help="overrides of variant A")
    parser.add_argument("--b", nargs="*", default=["backbone.num_levels=3"], help="overrides of variant B")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    from lors.data.benchmark import build_or_reuse
    from lors.experiments.runner import Job, run_jobs
    build_or_reuse("runs/bench_data", progress=False)
    jobs = [Job(f"variant {name}", step_time, (args.config, ov, args.steps)) for name, ov in (("A", args.a), ("B", args.b))]
    a, b = run_jobs(jobs, width=2, threads=1, quiet=True)  # both at once, one thread each
    print(f"{args.config}, {args.steps} steps each, both at once, 1 thread each (median step time)")
    print(f"A {' '.join(args.a) or '(config)'}: {a:.4f} s / step")
    print(f"B {' '.join(args.b) or '(config)'}: {b:.4f} s / step")
    print(f"B / A = {b / a:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
