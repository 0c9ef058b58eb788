"""`lors vit`: train a small ViT on Fashion-MNIST, compare dense, LORS, tied and dense-small,
or sweep dense widths against LORS ranks."""
from __future__ import annotations

import argparse
import json

from lors.commands._args import add_compare_parser, add_sweep_parser, add_train_parser, family_parser


def run_train(args: argparse.Namespace) -> int:
    from lors.experiments.vit.train import train
    from lors.models.vit import load_vit_config
    summary = train(load_vit_config(args.config, args.overrides), run_dir=args.run_dir, resume=not args.no_resume,
                    device=args.device, extend=args.extend)
    metrics = summary.get("metrics", {})
    print(json.dumps(summary, indent=2) if args.json else
          f"{summary['steps']} steps in {summary['run_dir']}" +
          (f": test accuracy {metrics['val_acc']:.2f} %" if metrics else ""))
    return 0


def _compare():
    from lors.experiments.vit.compare import compare_vit
    return compare_vit


def _sweep():
    from lors.experiments.vit.compare import sweep_vit
    return sweep_vit


def register(sub) -> None:
    cmds = family_parser(sub, "vit", "a small ViT on Fashion-MNIST: dense, LORS or tied blocks")

    add_train_parser(cmds, "vit", "a ViT (lors/configs/vit) on Fashion-MNIST", "vit_small", run_train,
                     "print the run summary as JSON")

    add_compare_parser(cmds, "ViT", "ViTs", "test accuracy", "vit_small", "vit_small_lors", "vit_small_tied",
                       "runs/vit_compare", _compare)
    add_sweep_parser(cmds, "ViT", "ViTs", "test accuracy", "vit_small", "vit_small_lors", "vit_small_lors_alloc",
                     [32, 40, 48, 64], [4, 8, 16, 32], "runs/vit_sweep", _sweep)
