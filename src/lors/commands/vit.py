"""`lors vit`: train a small ViT on Fashion-MNIST, compare dense, LORS, tied and dense-small,
or sweep dense widths against LORS ranks."""
from __future__ import annotations

import argparse
import json

from lors.commands._args import FamilyExperiments, add_family_experiments, add_train_parser, family_parser


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


EXPERIMENTS = FamilyExperiments(
    family="ViT", what="ViTs", metric="test accuracy", dense="vit_small", lors="vit_small_lors", tied="vit_small_tied",
    alloc="vit_small_lors_alloc", widths=(32, 40, 48, 64), ranks=(4, 8, 16, 32), module="lors.experiments.vit.compare",
    suffix="vit", out="runs/vit")


def register(sub) -> None:
    cmds = family_parser(sub, "vit", "a small ViT on Fashion-MNIST: dense, LORS or tied blocks")

    add_train_parser(cmds, "vit", "a ViT (lors/configs/vit) on Fashion-MNIST", "vit_small", run_train,
                     "print the run summary as JSON")

    add_family_experiments(cmds, EXPERIMENTS)
