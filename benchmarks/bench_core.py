"""Benchmark of the LORS core at the paper's shapes: prints ratios measured in one run.

(a) forward+backward of a 6-layer stack after ``share_layers`` versus the same plain stack
    (and, for reference, with the input's gradient too, and with one tied Linear);
(b) inference after ``merge`` versus the plain stack;
(c) ``AdaptiveLors.mix`` forward+backward versus materialising the weight by concatenation
    and sum, as in the paper's Figure 3 pseudo-code (results compared too), and the part both
    share (shared generator and mixing product) against Figure 3: the best ratio any ``mix`` could reach.

Times are medians over interleaved repeats after warm-up; a ratio is the median of the
ratios of adjacent runs. Raw numbers go to --out (JSON).

    python benchmarks/bench_core.py [--repeats 30] [--out docs/results/core.json] [--keep-heap]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from pathlib import Path

import torch
from torch import nn

import lors
from lors.engine.timing import interleaved, median_ratio

TARGETS = {"a": 1.10, "b": 1.02, "c": 1 / 1.3}  # ratio LORS/baseline must be <= target
# "a0" has no target: it shows what sharing one weight costs without any LORS term;
# "ax" (no target either) is case (a) with the input's gradient also computed, as inside a network;
# "c0": the part of (c) that any way of computing it shares (the shared generator and x @ W), a
# lower bound on (c)'s ratio


class Stage(nn.Module):
    """One stage's Linear; the stack applies every stage to its own input, as AdaMixer's
    output projection does."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


class Stack(nn.Module):
    def __init__(self, n: int, d_in: int, d_out: int):
        super().__init__()
        self.layers = nn.ModuleList(Stage(d_in, d_out) for _ in range(n))

    def forward(self, xs):  # xs: (N, rows, d_in)
        return torch.stack([layer(x) for layer, x in zip(self.layers, xs)])


def compare(fn_a, fn_b, repeats: int, warmup: int = 3) -> tuple[float, float, float]:
    """Median seconds of fn_a and of fn_b, run alternately, and the median of the ratios of
    adjacent runs (`lors.engine.timing`)."""
    times = interleaved({"a": fn_a, "b": fn_b}, repeats, warmup)
    return statistics.median(times["a"]), statistics.median(times["b"]), median_ratio(times["a"], times["b"])


def bench_stack(name, n, d_in, d_out, rows, rank, repeats):
    torch.manual_seed(0)
    plain = Stack(n, d_in, d_out)
    shared = copy.deepcopy(plain)
    lors.share_layers(shared, targets="proj", rank=rank)
    tied = copy.deepcopy(plain)
    for layer in tied.layers:  # plain weight tying: the cost of sharing alone
        layer.proj = tied.layers[0].proj
    xs, gy = torch.randn(n, rows, d_in), torch.randn(n, rows, d_out)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(xs).backward(gy)  # a fixed upstream gradient: time the layers, not a loss
        return run

    def step_with_input_grad(model):  # in a network the layer's input needs its gradient too
        x_req = xs.clone().requires_grad_()

        def run():
            model.zero_grad(set_to_none=True)
            x_req.grad = None
            model(x_req).backward(gy)
        return run

    t_lors, t_plain, r_lors = compare(step(shared), step(plain), repeats)
    t_lors_x, t_plain_x, r_lors_x = compare(step_with_input_grad(shared), step_with_input_grad(plain), repeats)
    t_tied, t_plain2, r_tied = compare(step(tied), step(plain), repeats)
    merged = lors.merge(copy.deepcopy(shared))

    def infer(model):
        def run():
            with torch.inference_mode():
                model(xs)
        return run

    t_merged, t_plain_inf, r_merged = compare(infer(merged), infer(plain), repeats * 2)
    return [
        dict(case="a", name=f"{name}: fwd+bwd, share_layers vs plain", lors_s=t_lors,
             base_s=t_plain, ratio=r_lors),
        dict(case="ax", name=f"{name}: same, input gradient too", lors_s=t_lors_x,
             base_s=t_plain_x, ratio=r_lors_x),
        dict(case="a0", name=f"{name}: fwd+bwd, one tied Linear vs plain", lors_s=t_tied,
             base_s=t_plain2, ratio=r_tied),
        dict(case="b", name=f"{name}: inference, merged vs plain", lors_s=t_merged,
             base_s=t_plain_inf, ratio=r_merged),
    ]


def figure3_weight(lors_a: lors.AdaptiveLors, q: torch.Tensor, i: int) -> torch.Tensor:
    """The paper's Figure 3: stack the shared weight and the K products B E A, then sum."""
    n, G, K, r = q.shape[0], lors_a.heads, lors_a.groups[i], lors_a.ranks[i]
    shared = lors_a.generator(q).view(n, G, 1, lors_a.d, lors_a.h)
    e = lors_a.E[i](q).view(n, G, K, r, r)
    private = lors_a.B[i] @ e @ lors_a.A[i]  # (n, G, K, d, h)
    return torch.cat([shared, private], dim=2).sum(dim=2)


def bench_adaptive(name, queries, heads, points, d, h, rank, groups, repeats):
    torch.manual_seed(0)
    mod = lors.AdaptiveLors(6, 256, (heads, d, h), rank=rank, groups=[groups] * 6)
    with torch.no_grad():  # trained-looking private parts
        for e in mod.E:
            e.weight.normal_(0, 0.02)
    q = torch.randn(queries, 256)
    x, gy = torch.randn(queries, heads, points, d), torch.randn(queries, heads, points, h)
    i = 5
    ours, ref = mod.mix(x, q, i), x @ figure3_weight(mod, q, i)
    rel = ((ours - ref).norm() / ref.norm()).item()

    def step(how):
        def run():
            mod.zero_grad(set_to_none=True)
            if how == "mix":
                y = mod.mix(x, q, i)
            elif how == "figure3":
                y = x @ figure3_weight(mod, q, i)
            else:  # what every way of computing it shares: the shared generator and the mixing product
                y = x @ mod.generator(q).view(queries, heads, d, h)
            y.backward(gy)
        return run

    t_mix, t_fig3, ratio = compare(step("mix"), step("figure3"), repeats)
    t_floor, t_fig3b, r_floor = compare(step("shared only"), step("figure3"), repeats)
    return [dict(case="c", name=f"{name}: fwd+bwd, mix vs Figure 3", lors_s=t_mix,
                 base_s=t_fig3, ratio=ratio, rel_err=rel),
            dict(case="c0", name=f"{name}: same, the shared part alone vs Figure 3", lors_s=t_floor,
                 base_s=t_fig3b, ratio=r_floor)]


def keep_heap() -> None:
    """glibc: allocations up to 1 GiB from the heap (not fresh pages from the system each time),
    and freed memory kept. By default large temporaries (above 32 MiB at most) are mapped
    afresh on every call and pay page faults, a cost that depends on the allocator's history."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_MMAP_THRESHOLD, 2**30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise SystemExit("--keep-heap: this C library refused mallopt; run without it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="docs/results/core.json")
    parser.add_argument("--keep-heap", action="store_true",
                        help="serve every allocation from the process heap and never hand it back (glibc), "
                             "so no case pays page faults for fresh memory")
    args = parser.parse_args()
    if args.keep_heap:
        keep_heap()
    rows = []
    # the paper's LORS^T: output projection 2*128*128 -> 256, 6 stages, r=8, K=1;
    # 2 images x 100 queries per step
    rows += bench_stack("L_output 32768->256, 200 rows", 6, 32768, 256, 200, 8, args.repeats)
    # a transformer FFN projection at many tokens, where W_i is materialised
    rows += bench_stack("FFN 256->2048, 4096 rows", 6, 256, 2048, 4096, 8, args.repeats)
    # the paper's LORS^A, r=16, K=3 (the largest K of [1,1,2,2,3,3]), 2 groups, 200 queries
    rows += bench_adaptive("ASM 64->128 (P=128 ch.)", 200, 2, 128, 64, 128, 16, 3, args.repeats)
    rows += bench_adaptive("ACM 128->128 (P=64 pts)", 200, 2, 64, 128, 128, 16, 3, args.repeats)

    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
               + (", --keep-heap" if args.keep_heap else ""))
    print(f"machine: {machine}; medians of {args.repeats} interleaved repeats after 3 warm-ups "
          "(ratio: median of adjacent-run ratios)")
    width = max(len(row["name"]) for row in rows)
    print(f"{'case':<{width + 6}s} {'lors ms':>9s} {'base ms':>9s} {'ratio':>7s} {'target':>8s}  ok")
    for row in rows:
        target = TARGETS.get(row["case"])
        row["target"] = target
        row["ok"] = None if target is None else row["ratio"] <= target
        verdict = "info" if target is None else ("yes" if row["ok"] else "NO")
        extra = f"  rel.err {row['rel_err']:.1e}" if "rel_err" in row else ""
        goal = "-" if target is None else "<=" + format(target, ".2f")
        print(f"{'(' + row['case'] + ')':<5s} {row['name']:<{width}s} {row['lors_s'] * 1e3:>9.2f} "
              f"{row['base_s'] * 1e3:>9.2f} {row['ratio']:>7.3f} {goal:>8s}  {verdict}{extra}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"raw numbers: {out}")


if __name__ == "__main__":
    main()
