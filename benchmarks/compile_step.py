"""Is `torch.compile` worth it for the transformer comparisons on this machine?

One training step (forward, backward, AdamW) of the GPT presets (`gpt_small`, `gpt_small_lors`)
and the ViT presets (`vit_small`, `vit_small_lors`), eager against `torch.compile`d, timed side
by side (`lors.engine.timing.interleaved`) with one thread, as `lors lm compare` runs each
model. Prints the median step time of each and the median ratio compiled / eager, and how
long compiling took (the first compiled step). The figure in docs/results/transformers.md
comes from it.

    .venv/bin/python benchmarks/compile_step.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from lors.engine.loop import adamw
from lors.engine.timing import interleaved, median_ratio, ratio_quartiles


def gpt(preset: str):
    from lors.experiments.lm.train import lm_loss
    from lors.models.gpt import build_gpt, load_lm_config
    cfg = load_lm_config(preset)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (cfg.train.batch_size, cfg.model.block_size + 1), generator=g)
    return (lambda: build_gpt(cfg)), (lambda m: lm_loss(m, x[:, :-1], x[:, 1:]))


def vit(preset: str):
    from lors.models.vit import build_vit, load_vit_config
    cfg = load_vit_config(preset)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.train.batch_size, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, generator=g)
    y = torch.randint(0, 10, (cfg.train.batch_size,), generator=g)
    return (lambda: build_vit(cfg)), (lambda m: F.cross_entropy(m(x), y))


def stepper(model, loss_fn):
    opt = adamw(model, 1e-3, 0.1)

    def step():
        loss_fn(model).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, 1 thread, "
          f"{args.repeats} interleaved rounds after 3 warm-up rounds")
    print(f"{'preset':<16} {'eager (ms)':>11} {'compiled (ms)':>14} {'compiled/eager':>15} {'(quartiles)':>14} "
          f"{'compile (s)':>12}")
    for family, preset in (("gpt", "gpt_small"), ("gpt", "gpt_small_lors"), ("vit", "vit_small"),
                           ("vit", "vit_small_lors")):
        build, loss_fn = (gpt if family == "gpt" else vit)(preset)
        torch.manual_seed(0)
        eager = build()
        torch.manual_seed(0)
        compiled = torch.compile(build())
        step_eager, step_compiled = stepper(eager, loss_fn), stepper(compiled, loss_fn)
        tic = time.perf_counter()
        step_compiled()  # compiles forward and backward
        compile_s = time.perf_counter() - tic
        times = interleaved({"eager": step_eager, "compiled": step_compiled}, args.repeats)
        q1, q3 = ratio_quartiles(times["compiled"], times["eager"])
        print(f"{preset:<16} {statistics.median(times['eager']) * 1e3:>11.1f} "
              f"{statistics.median(times['compiled']) * 1e3:>14.1f} "
              f"{median_ratio(times['compiled'], times['eager']):>15.2f} {f'{q1:.2f}-{q3:.2f}':>14} "
              f"{compile_s:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
