"""`lors params`: parameter reports computed by counting real module instances."""
from __future__ import annotations

import argparse
import json

from torch import nn

from lors.core import AdaptiveLors, StaticLors, count_parameters

# Paper Table 1 as printed: (r, parameters per layer, percentage).
PAPER_TABLE1 = {
    "static": {4: ("1.53M", 18.3), 8: ("1.66M", 19.8), 16: ("1.93M", 23.0), 32: ("2.46M", 29.3)},
    "adaptive": {4: ("0.36M", 17.2), 8: ("0.39M", 18.6), 16: ("0.49M", 23.3), 32: ("0.89M", 42.4)},
}
NUM_LAYERS = 6


def table1() -> dict:
    """Paper Table 1 from real modules (built on the meta device, so nothing is allocated).

    LORS^T: the output projection, a Linear from 2*128*128 = 32768 to 256, K=1.
    LORS^A: the spatial-mixing generator, d_q=256 to a 64 x 128 weight, K=2.
    Weights only (no biases), N=6 layers, shared parameters averaged over the 6 layers.
    """
    cases = {
        "static": (nn.Linear(32768, 256, bias=False, device="meta"),
                   lambda r: StaticLors(NUM_LAYERS, 32768, 256, rank=r, groups=1, bias=False,
                                        device="meta")),
        "adaptive": (nn.Linear(256, 64 * 128, bias=False, device="meta"),
                     lambda r: AdaptiveLors(NUM_LAYERS, 256, (64, 128), rank=r, groups=2,
                                            bias=False, device="meta")),
    }
    out = {}
    for kind, (plain, build) in cases.items():
        without = count_parameters(plain).total
        rows = []
        for r, (paper_m, paper_pct) in PAPER_TABLE1[kind].items():
            stack = build(r)
            counts = count_parameters(stack)
            per_layer = counts.total / NUM_LAYERS
            rows.append({"rank": r, "stack_total": counts.total, "shared": counts.shared,
                         "private": counts.private, "per_layer": per_layer,
                         "without_per_layer": without,
                         "percent": 100.0 * per_layer / without,
                         "paper_per_layer": paper_m, "paper_percent": paper_pct})
        out[kind] = rows
    return out


def _print_table1(result: dict) -> None:
    names = {"static": "LORS^T (d=32768, h=256, K=1)", "adaptive": "LORS^A (d_q=256, d=64, h=128, K=2)"}
    print(f"Paper Table 1: parameters per layer, N={NUM_LAYERS}, shared part averaged over the layers")
    for kind, rows in result.items():
        print(f"\n{names[kind]}")
        print(f"{'r':>4s} {'W/ LORS':>10s} {'W/O LORS':>10s} {'percent':>8s}   "
              f"{'paper W/':>9s} {'paper %':>8s}")
        for row in rows:
            ours_m, ours_pct = f"{row['per_layer'] / 1e6:.2f}M", round(row["percent"], 1)
            same = ours_m == row["paper_per_layer"] and ours_pct == row["paper_percent"]
            print(f"{row['rank']:>4d} {ours_m:>10s} {row['without_per_layer'] / 1e6:>9.2f}M "
                  f"{ours_pct:>7.1f}%   {row['paper_per_layer']:>9s} {row['paper_percent']:>7.1f}%"
                  f"{'' if same else '   (differs)'}")
    print("\nCounts come from real modules; `--json` gives them exactly. See docs/results/core.md "
          "for why a few printed paper figures differ in the last digit.")


def run_table1(args: argparse.Namespace) -> int:
    result = table1()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table1(result)
    return 0


def register(sub) -> None:
    parser = sub.add_parser("params", help="parameter reports counted from real modules")
    reports = parser.add_subparsers(dest="report", required=True, metavar="REPORT")
    t1 = reports.add_parser("table1", help="the paper's Table 1 (LORS^T and LORS^A per-layer counts)")
    t1.add_argument("--json", action="store_true", help="exact integer counts as JSON")
    t1.set_defaults(func=run_table1)

    def run_detect(args: argparse.Namespace) -> int:
        from lors.models.adamixer.report import main as detect_main  # torchvision only when asked
        return detect_main(args)

    det = reports.add_parser("detect", help="AdaMixer (+ LORS) detector parameters by component, and MACs")
    det.add_argument("--config", required=True, metavar="NAME_OR_PATH",
                     help="a preset in configs/detect (e.g. adamixer_lors_r50_1x) or a YAML file")
    det.add_argument("--json", action="store_true", help="exact integer counts as JSON")
    det.add_argument("--flops", action="store_true",
                     help="also count multiply-accumulates (FLOPs / 2) at 1333x800 with torch's FlopCounterMode")
    det.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="config overrides with dotted keys, e.g. decoder.num_queries=300")
    det.set_defaults(func=run_detect)
