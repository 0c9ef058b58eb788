"""`lors detect`: train, evaluate and run the AdaMixer (+ LORS) detector."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from lors.commands._args import json_only, positive_int
from lors.commands.detect_data import add_data_parser
from lors.experiments.detection.bench import LORS, PRETRAIN_STEPS, VANILLA, SweepOptions


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what `predict --out` writes
DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: this process's GPU, else CPU)"


def _device(text: str) -> str:
    """argparse type of --device: cpu, cuda, cuda:N or mps."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda, cuda:N (N = 0, 1, ...) or mps")
    return text


def _image_out(text: str) -> str:
    """argparse type of predict --out: a path ending in .png, .jpg or .jpeg."""
    suffix = Path(text).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        what = f"ends in {suffix!r}" if suffix else "has no extension"
        example = Path(text).with_suffix(".png") if suffix else f"{text}.png"
        raise argparse.ArgumentTypeError(f"{text!r} {what}: name the output image with "
                                         f"{', '.join(IMAGE_SUFFIXES)}, e.g. {example}")
    return text


def _json_out(text: str) -> str:
    """argparse type of predict --json: a path ending in .json."""
    if Path(text).suffix.lower() != ".json":
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .json: name the COCO results file "
                                         f"with .json, e.g. {Path(text).with_suffix('.json')}")
    return text


def _config(args: argparse.Namespace):
    from lors.models.adamixer import load_detector_config
    return load_detector_config(args.config, args.overrides)


def _sweep_options(args: argparse.Namespace) -> SweepOptions:
    return SweepOptions(**{k: getattr(args, k) for k in SweepOptions.__dataclass_fields__})


def run_compare(args: argparse.Namespace) -> int:
    from lors.experiments.detection.bench import compare
    compare(_sweep_options(args), out=args.out, vanilla=args.vanilla, lors=args.lors)
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from lors.experiments.detection.bench import ablate
    ablate(_sweep_options(args), args.suite, config=args.config, out_dir=args.out_dir,
           runs_dir=args.runs_dir, retrain=args.retrain, parts=args.part)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from lors.experiments.detection.train import train
    cfg = _config(args)
    with json_only(args):
        summary = train(cfg, run_dir=args.run_dir, resume=not args.no_resume, device=args.device,
                        evaluate_at_end=not args.no_eval, extend=args.extend)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lors.experiments.detection.evaluate import evaluate_run
    with json_only(args):
        metrics = evaluate_run(args.checkpoint, args.overrides, args.config, args.device, verbose=not args.json)
    print(json.dumps(metrics, indent=2) if args.json else
          "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from lors.experiments.detection.predict import predict_image
    if args.out is None and args.json_path is None:
        raise ValueError("nothing to write: pass --out IMAGE.png (the detections drawn) and/or "
                         "--json DETS.json (COCO results)")
    found = predict_image(args.checkpoint, args.image, args.out, args.score_threshold, args.overrides,
                          json_out=args.json_path, image_id=args.image_id)
    where = [f"drawn to {args.out}"] if args.out else []
    where += [f"written to {args.json_path} (COCO results)"] if args.json_path else []
    print(f"{found} detections with score >= {args.score_threshold} {' and '.join(where)}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from lors.experiments.detection.merge import merge_run
    done = merge_run(args.checkpoint, args.out)
    print(json.dumps(done, indent=2) if args.json else
          f"merged {done['source']} into {done['checkpoint']}: a plain AdaMixer of {done['params_after']:,} "
          f"parameters (the LORS model has {done['params_before']:,}), the same detections; "
          f"lors detect eval --checkpoint {args.out}")
    return 0


def register(sub) -> None:
    parser = sub.add_parser("detect", help="train, evaluate and run the AdaMixer (+ LORS) detector")
    cmds = parser.add_subparsers(dest="detect_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("train", help="train a detector on COCO-format data")
    p.add_argument("--config", required=True, help="preset name (lors/configs/detect/NAME.yaml) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, dotted keys; e.g. train.eval_every_epochs=4 also scores COCO AP on "
                        "val every 4 epochs (val.csv), train.log_private_norms=true logs the norms of the LORS "
                        "terms per stage (log.csv)")
    p.add_argument("--run-dir", help="checkpoints and logs (default: train.output_dir)")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even if run-dir has a checkpoint (the old run is deleted once "
                        "the new one has saved its first checkpoint)")
    p.add_argument("--extend", action="store_true",
                   help="let a larger train.epochs continue a run that was started with fewer")
    p.add_argument("--no-eval", action="store_true", help="skip COCO evaluation at the end")
    p.add_argument("--device", type=_device, help=DEVICE_HELP)
    p.add_argument("--json", action="store_true",
                   help="print the run summary as JSON, alone on stdout (other output goes to stderr)")
    p.set_defaults(func=run_train)

    p = cmds.add_parser("eval", help="COCO AP of a checkpoint on the val split of its config")
    p.add_argument("--checkpoint", required=True, help="a run directory or a ckpt_* folder")
    p.add_argument("--config", help="evaluate with this config instead of the checkpoint's")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.add_argument("--device", type=_device, help=DEVICE_HELP)
    p.add_argument("--json", action="store_true",
                   help="print the metrics as JSON, alone on stdout (other output goes to stderr)")
    p.set_defaults(func=run_eval)

    add_data_parser(cmds)
    add_bench_parsers(cmds)

    p = cmds.add_parser("merge", help="fold a LORS run into a plain AdaMixer checkpoint (same detections, vanilla speed)")
    p.add_argument("--checkpoint", required=True, help="a run directory or a ckpt_* folder of an AdaMixer + LORS run")
    p.add_argument("--out", required=True, help="a new run directory for the merged checkpoint")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=run_merge)

    p = cmds.add_parser("predict", help="a checkpoint's detections on an image: drawn on it and/or as COCO results")
    p.add_argument("--checkpoint", required=True, help="a run directory or a ckpt_* folder")
    p.add_argument("--image", required=True, help="the image file (PNG, JPEG, ...)")
    p.add_argument("--out", type=_image_out,
                   help="output image with the detections drawn: a .png, .jpg or .jpeg path")
    p.add_argument("--json", dest="json_path", type=_json_out, metavar="DETS.json",
                   help="write the detections as COCO results: a list of {image_id, category_id, "
                        "bbox [x, y, w, h] in pixels, score}")
    p.add_argument("--image-id", type=int, default=0,
                   help="the image_id of those results (default %(default)s; the id of the image in "
                        "your COCO annotations, to score them against it)")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="keep detections scoring at least this, in the picture and the JSON "
                        "(default %(default)s; 0 keeps all test.max_detections)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.set_defaults(func=run_predict)


def _common(p: argparse.ArgumentParser, seeds_default: tuple[int, ...] | None = (0,),
            seeds_help: str = "train.seed values (default 0)") -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=None if seeds_default is None else list(seeds_default),
                   metavar="S", help=seeds_help)
    p.add_argument("--data-dir", default="runs/bench_data",
                   help="benchmark folder: built if missing or empty; a folder that holds one is reused "
                        "with its own settings (default runs/bench_data)")
    p.add_argument("--data-set", action="append", default=[], metavar="KEY=VALUE",
                   help="BenchmarkConfig override for a new data folder, e.g. num_train=100 (repeatable); "
                        "on an existing folder a differing value is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--in-process", action="store_true",
                   help="train in this process (starts faster; peak memory is then the largest so far)")
    p.add_argument("--max-steps", type=positive_int, default=None, metavar="N",
                   help="stop each run after N steps (the schedule is unchanged) and evaluate there")
    p.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                   help="runs trained at the same time, each in its own process with an equal share "
                        "of the CPU threads (default: the number of CPU cores, at most 2)")
    p.add_argument("--pretrain", action=argparse.BooleanOptionalAction, default=True,
                   help="start the backbones from a ResNet-18 pretrained as a digit classifier on the "
                        "train split's digits only (cached in DATA_DIR under a name keyed by its "
                        "settings; default on)")
    p.add_argument("--pretrain-steps", type=positive_int, default=PRETRAIN_STEPS, metavar="N",
                   help=f"training steps of that pretraining (default {PRETRAIN_STEPS}); each "
                        "step count is cached separately")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="detector config overrides for every run (anywhere but right after --seeds)")


def add_bench_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `compare` and `ablate` to the `detect` command's sub-parsers."""
    p = subparsers.add_parser(
        "compare", help="train and score AdaMixer and AdaMixer + LORS on the digits benchmark",
        description="Build the benchmark (cached), train the vanilla and LORS bench configs with the "
                    "same schedule and seeds, evaluate with COCOeval, print a table and write "
                    "summary.json, table.md, ap_vs_decoder_params.png and predictions.png to --out.")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--vanilla", default=VANILLA, help=f"vanilla config (default {VANILLA})")
    p.add_argument("--lors", default=LORS, help=f"LORS config (default {LORS})")
    _common(p)
    p.set_defaults(func=run_compare)

    p = subparsers.add_parser(
        "ablate", help="the paper's ablation tables 4-8 at small scale, and the schedule suite",
        description="Train each variant of a suite (overrides of the LORS bench config, or of a row's own "
                    "config) and write ablation_SUITE.md, .json and .png to --out-dir, from every row whose "
                    "runs are finished; where rows differ in train.epochs or evaluate during training "
                    "(train.eval_every_epochs), also ablation_SUITE_epochs.png (AP against epochs). "
                    "Suites: table4 ... table8, layout, and schedule (both bench configs at 16, 32 and "
                    "48 epochs, the lr drop at 7/8 of each; run it in parts: --part 16, --part 32, "
                    "--part 48, one call each).")
    p.add_argument("--suite", required=True,
                   help="a suite in lors/configs/ablate (table4 ... table8, layout, schedule) or the path of a "
                        "suite YAML file")
    p.add_argument("--part", action="append", default=None, metavar="PART",
                   help="train only the rows of this part of the suite (repeatable); the table still shows "
                        "every row whose runs an earlier call finished")
    p.add_argument("--config", default=None, help="the config the rows override (default: the suite's, "
                                                  f"{LORS} for the paper's tables; not for a suite whose "
                                                  "rows name their own)")
    p.add_argument("--out-dir", default="runs/ablate",
                   help="where the table and plot go (default runs/ablate; the committed tables in "
                        "docs/results were written with --out-dir docs/results)")
    p.add_argument("--runs", dest="runs_dir", default="runs/ablate",
                   help="run directories, one per resolved config (a hash of it): a finished run is "
                        "reused by every row and later call that trains the same config")
    p.add_argument("--retrain", action="store_true",
                   help="train every row (of --part) again, even if finished")
    _common(p, seeds_default=None, seeds_help="train.seed values for every row (default: each row's own "
                                             "seeds where the suite lists them, else 0)")
    p.set_defaults(func=run_ablate)
