"""`lors params`: parameter reports computed by counting real module instances."""
from __future__ import annotations

import argparse
import json

from lors.experiments.params import print_detect_report, print_table1, table1


def run_table1(args: argparse.Namespace) -> int:
    result = table1()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table1(result)
    return 0


def register(sub) -> None:
    parser = sub.add_parser("params", help="parameter reports counted from real modules")
    reports = parser.add_subparsers(dest="report", required=True, metavar="REPORT")
    t1 = reports.add_parser("table1", help="the paper's Table 1 (LORS^T and LORS^A per-layer counts)")
    t1.add_argument("--json", action="store_true", help="exact integer counts as JSON")
    t1.set_defaults(func=run_table1)

    def run_detect(args: argparse.Namespace) -> int:
        from lors.models.adamixer import load_detector_config  # torchvision only when asked
        from lors.models.adamixer.report import detect_report
        report = detect_report(load_detector_config(args.config, args.overrides), flops=args.flops)
        if args.json:
            print(json.dumps({"config": str(args.config), **report}, indent=2))
        else:
            print_detect_report(report, str(args.config))
        return 0

    det = reports.add_parser("detect", help="AdaMixer (+ LORS) detector parameters by component, and MACs")
    det.add_argument("--config", required=True, metavar="NAME_OR_PATH",
                     help="a preset in lors/configs/detect (e.g. adamixer_lors_r50_1x) or a YAML file")
    det.add_argument("--json", action="store_true", help="exact integer counts as JSON")
    det.add_argument("--flops", action="store_true",
                     help="also count multiply-accumulates (FLOPs / 2) at 1333x800 with torch's FlopCounterMode")
    det.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="config overrides with dotted keys, e.g. decoder.num_queries=300")
    det.set_defaults(func=run_detect)
