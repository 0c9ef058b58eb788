"""Training-step time of a detector config against a variant of it, measured in one run.

Both variants train at the same time, each in its own process with one CPU thread, as
`lors detect compare` runs them on a 2-core machine, on the default digits benchmark
(`runs/bench_data`, built if missing) from random backbone weights (the cost is the same).
Each reports the median wall time of its steps after the first ``--skip``; the ratio is B / A.

    python benchmarks/bench_detect_step.py                  # bench_adamixer, C2..C5 vs C2..C4
    python benchmarks/bench_detect_step.py --config bench_adamixer_lors --steps 200 \\
        --a backbone.num_levels=4 --b backbone.num_levels=3
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time


def _child(config: str, overrides: list[str], steps: int, skip: int, queue) -> None:
    import torch

    from lors.commands.detect_bench import data_overrides
    from lors.engine.train import SeededItems, build_datasets, to_device
    from lors.models.adamixer import build_criterion, build_detector, load_detector_config
    from lors.data.coco import collate_fn
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_detector_config(config, [*data_overrides("runs/bench_data"), "backbone.weights=null", *overrides])
    train_set, _ = build_datasets(cfg, val=False)
    model, criterion = build_detector(cfg), build_criterion(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    items = SeededItems(train_set, 0)
    b = cfg.train.batch_size
    times = []
    for step in range(steps):
        batch = collate_fn([items[(step * b + i) % len(train_set)] for i in range(b)], cfg.data.size_divisor)
        tic = time.perf_counter()
        images, sizes, targets = to_device(*batch, torch.device("cpu"))
        loss = criterion.total(criterion(model(images, sizes), targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad)
        opt.step()
        times.append(time.perf_counter() - tic)
    queue.put(statistics.median(times[skip:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bench_adamixer")
    parser.add_argument("--a", nargs="*", default=["backbone.num_levels=4"], help="overrides of variant A")
    parser.add_argument("--b", nargs="*", default=["backbone.num_levels=3"], help="overrides of variant B")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the median")
    args = parser.parse_args(argv)
    from lors.commands.detect_bench import build_data
    build_data("runs/bench_data", progress=False)
    ctx = multiprocessing.get_context("spawn")
    queues = [ctx.Queue(), ctx.Queue()]
    children = [ctx.Process(target=_child, args=(args.config, ov, args.steps, args.skip, q))
                for ov, q in zip((args.a, args.b), queues)]
    for child in children:
        child.start()
    a, b = (q.get() for q in queues)
    for child in children:
        child.join()
    print(f"{args.config}, {args.steps} steps each ({args.skip} warm-up), both at once, 1 thread each")
    print(f"A {' '.join(args.a) or '(config)'}: {a:.4f} s / step")
    print(f"B {' '.join(args.b) or '(config)'}: {b:.4f} s / step")
    print(f"B / A = {b / a:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
