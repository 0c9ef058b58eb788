"""Parameter reports counted from real module instances: the paper's Table 1 and the
detector's parameters by component (`lors params`)."""
from __future__ import annotations

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


def print_table1(result: dict) -> None:
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




def print_detect_report(report: dict, name: str) -> None:
    """Print a `detect_report` as an indented table."""
    from lors.models.adamixer.report import LABELS  # torchvision only when asked
    print(f"{name}: {report['model']}")
    rows = [("backbone", report["backbone"]), ("neck", report["neck"]), ("queries", report["queries"]),
            ("decoder", report["decoder"])]
    for label, value in rows:
        print(f"  {label:<42s}{value:>14,d}")
    for key, value in report["decoder_components"].items():
        extra = ""
        split = report["lors"].get(key)
        if split and (split["shared"] or split["private"]):
            extra = f"   (LORS shared {split['shared']:,d}, private {split['private']:,d})"
        print(f"    {LABELS.get(key, key):<40s}{value:>14,d}{extra}")
    print(f"  {'total':<42s}{report['total']:>14,d}")
    if "macs" in report:
        m = report["macs"]
        h, w = m["input"]
        print(f"MACs at {w}x{h} (FlopCounterMode FLOPs / 2): decoder {m['decoder'] / 1e9:.2f} G, "
              f"backbone + neck {m['backbone_neck'] / 1e9:.2f} G, model {m['model'] / 1e9:.2f} G")
