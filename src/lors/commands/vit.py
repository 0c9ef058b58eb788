"""`lors vit`: train a small ViT on Fashion-MNIST, or compare dense, LORS, tied and dense-small."""
from __future__ import annotations

import argparse
import json


def run_train(args: argparse.Namespace) -> int:
    from lors.experiments.vit.train import train
    from lors.models.vit import load_vit_config
    summary = train(load_vit_config(args.config, args.overrides), run_dir=args.run_dir, resume=not args.no_resume,
                    device=args.device)
    metrics = summary.get("metrics", {})
    print(json.dumps(summary, indent=2) if args.json else
          f"{summary['steps']} steps in {summary['run_dir']}" +
          (f": test accuracy {metrics['val_acc']:.2f} %" if metrics else ""))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from lors.experiments.vit.compare import compare_vit
    compare_vit(args.seeds, args.out, args.dense, args.lors, args.tied, args.overrides, args.jobs, args.quiet)
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def register(sub) -> None:
    parser = sub.add_parser("vit", help="a small ViT on Fashion-MNIST: dense, LORS or tied blocks")
    cmds = parser.add_subparsers(dest="vit_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("train", help="train a ViT (configs/vit) on Fashion-MNIST")
    p.add_argument("--config", default="vit_small", help="preset name (configs/vit/NAME.yaml) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.add_argument("--run-dir", help="checkpoints and logs (default: train.output_dir)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if run-dir has a checkpoint")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: this process's GPU, else CPU)")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=run_train)

    p = cmds.add_parser("compare", help="dense vs LORS vs tied vs dense-small ViT, same images and seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="S")
    p.add_argument("--out", default="runs/vit_compare")
    p.add_argument("--dense", default="vit_small")
    p.add_argument("--lors", default="vit_small_lors")
    p.add_argument("--tied", default="vit_small_tied")
    p.add_argument("--jobs", type=_positive, default=None, help="runs at a time (default: cores, at most 2)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for all four models")
    p.set_defaults(func=run_compare)
