"""`lors detect`: train, evaluate and run the AdaMixer (+ LORS) detector."""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

import torch

from lors.experiments.detection.bench import add_bench_parsers
from lors.commands.detect_data import add_data_parser


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


def _json_only(args: argparse.Namespace):
    """With --json, stdout carries the JSON alone: what the work prints (COCOeval's table) goes
    to stderr."""
    return contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()


def _config(args: argparse.Namespace):
    from lors.models.adamixer import load_detector_config
    return load_detector_config(args.config, args.overrides)


def run_train(args: argparse.Namespace) -> int:
    from lors.experiments.detection.train import train
    cfg = _config(args)
    with _json_only(args):
        summary = train(cfg, run_dir=args.run_dir, resume=not args.no_resume, device=args.device,
                        evaluate_at_end=not args.no_eval, extend=args.extend)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lors.engine.distributed import init_distributed
    from lors.experiments.detection.train import evaluate_checkpoint, run_config
    ckpt, cfg, _ = run_config(args.checkpoint, args.overrides)
    if args.config:
        cfg = _config(args)
    _, _, dev = init_distributed(args.device)
    with _json_only(args):
        metrics = evaluate_checkpoint(ckpt, cfg, dev, verbose=not args.json)
    print(json.dumps(metrics, indent=2) if args.json else
          "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from lors.data.coco import collate_fn, load_rgb
    from lors.data.transforms import make_coco_transforms
    from lors.engine.checkpoint import load_checkpoint
    from lors.experiments.detection.train import run_config
    from lors.models.adamixer import PostProcess, build_detector
    from lors.plots import draw_detections
    ckpt, cfg, state = run_config(args.checkpoint, args.overrides)
    path = Path(args.image)
    image = load_rgb(path)  # 8-bit RGB, 16-bit scaled; ImageFileError (a ValueError) names the file
    model = build_detector(cfg).eval()
    load_checkpoint(ckpt, model)
    transform = make_coco_transforms(False, (cfg.data.min_size,), cfg.data.max_size)
    batch, size, _ = collate_fn([transform(image, {"boxes": torch.zeros(0, 4)})], cfg.data.size_divisor)
    with torch.no_grad():
        outputs = model(batch, size)
    det = PostProcess(cfg.test.max_detections)(outputs, size, torch.tensor([[image.height, image.width]]))[0]
    keep = det["scores"] >= args.score_threshold
    det = {k: v[keep] for k, v in det.items()}
    draw_detections(image, det, state["class_names"], args.out)
    print(f"{int(keep.sum())} detections with score >= {args.score_threshold} drawn to {args.out}")
    return 0


def register(sub) -> None:
    parser = sub.add_parser("detect", help="train, evaluate and run the AdaMixer (+ LORS) detector")
    cmds = parser.add_subparsers(dest="detect_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("train", help="train a detector on COCO-format data")
    p.add_argument("--config", required=True, help="preset name (configs/detect/NAME.yaml) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
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

    p = cmds.add_parser("predict", help="draw a checkpoint's detections on an image")
    p.add_argument("--checkpoint", required=True, help="a run directory or a ckpt_* folder")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, type=_image_out, help="output image: a .png, .jpg or .jpeg path")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.set_defaults(func=run_predict)
