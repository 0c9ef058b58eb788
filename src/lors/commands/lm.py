"""`lors lm`: train, evaluate and sample byte-level GPT language models (dense, LORS or tied)."""
from __future__ import annotations

import argparse
import json

from lors.commands._args import (DEVICE_HELP, FamilyExperiments, add_family_experiments, add_train_parser, family_parser,
                                 json_only, positive_int)


def run_train(args: argparse.Namespace) -> int:
    from lors.experiments.lm.train import train
    from lors.models.gpt import load_lm_config
    with json_only(args):
        summary = train(load_lm_config(args.config, args.overrides), run_dir=args.run_dir, resume=not args.no_resume,
                        device=args.device, extend=args.extend, parallel=args.parallel)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    metrics, params = summary.get("metrics", {}), summary["parameters"]
    print(f"{summary['steps']} steps in {summary['run_dir']}" +
          (f": val bits per byte {metrics['val_bpb']:.4f}, perplexity {metrics['val_ppl']:.2f}" if metrics else ""))
    print(f"parameters: {params['total']:,} ({params['non_embedding']:,} non-embedding; shared tensors once)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lors.experiments.lm.train import evaluate_run
    metrics = evaluate_run(args.checkpoint, args.overrides, args.device)
    print(json.dumps(metrics, indent=2) if args.json else
          f"val bits per byte {metrics['val_bpb']:.4f}, perplexity {metrics['val_ppl']:.2f}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from lors.experiments.lm.train import sample
    print(sample(args.checkpoint, args.prompt, args.tokens, top_k=args.top_k, seed=args.seed, merged=args.merged))
    return 0


EXPERIMENTS = FamilyExperiments(
    family="GPT", what="byte-level GPTs", metric="val bits per byte", dense="gpt_small", lors="gpt_small_lors",
    tied="gpt_small_tied", alloc="gpt_small_lors_alloc", widths=(48, 64, 96, 128), ranks=(4, 8, 16, 32),
    module="lors.experiments.lm.compare", suffix="lm", out="runs/lm")


def register(sub) -> None:
    cmds = family_parser(sub, "lm", "train, evaluate and sample byte-level GPT language models")

    p = add_train_parser(cmds, "lm", "a GPT (lors/configs/lm) on a byte-level corpus", "gpt_small", run_train,
                         "print the run summary as JSON (with parameters: total and non_embedding), alone on "
                         "stdout (other output goes to stderr)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: ddp (a full replica per process, the default) or fsdp (FSDP2: "
                        "each process holds 1/N of every weight, for models that do not fit one device)")

    p = cmds.add_parser("eval", help="val bits per byte and perplexity of a trained run")
    p.add_argument("--checkpoint", required=True, help="a run directory or a ckpt_* folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.*)")
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run_eval)

    p = cmds.add_parser("sample", help="generate text from a prompt")
    p.add_argument("--checkpoint", required=True, help="a run directory or a ckpt_* folder")
    p.add_argument("--prompt", default="", help="text to continue (default: a new line)")
    p.add_argument("--tokens", type=positive_int, default=200,
                   help="tokens to generate: bytes, or BPE tokens for a data.tokenizer=bpe run (default %(default)s)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample from the k most likely bytes "
                                                                 "(default: greedy)")
    p.add_argument("--seed", type=int, default=0, help="seed of the top-k sampling")
    p.add_argument("--merged", action="store_true", help="merge the LORS layers into plain Linears first "
                                                         "(the same text, as fast as a dense model)")
    p.set_defaults(func=run_sample)

    add_family_experiments(cmds, EXPERIMENTS)
