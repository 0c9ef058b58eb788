"""`lors detect`: train, evaluate and run the AdaMixer (+ LORS) detector."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lors.commands.detect_bench import add_bench_parsers
from lors.commands.detect_data import add_data_parser


def _config(args: argparse.Namespace):
    from lors.models.adamixer import load_detector_config
    return load_detector_config(args.config, args.overrides)


def run_train(args: argparse.Namespace) -> int:
    from lors.engine.train import train
    cfg = _config(args)
    summary = train(cfg, run_dir=args.run_dir, resume=not args.no_resume, device=args.device,
                    evaluate_at_end=not args.no_eval)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lors.engine.distributed import init_distributed
    from lors.engine.train import evaluate_checkpoint, run_config
    ckpt, cfg, _ = run_config(args.checkpoint, args.overrides)
    if args.config:
        cfg = _config(args)
    _, _, dev = init_distributed(args.device)
    metrics = evaluate_checkpoint(ckpt, cfg, dev, verbose=not args.json)
    print(json.dumps(metrics, indent=2) if args.json else
          "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from lors.data.coco import collate_fn
    from lors.data.transforms import make_coco_transforms
    from lors.engine.checkpoint import load_checkpoint
    from lors.engine.train import run_config
    from lors.models.adamixer import PostProcess, build_detector
    from lors.plots import draw_detections
    ckpt, cfg, state = run_config(args.checkpoint, args.overrides)
    path = Path(args.image)
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path} ({err}): pass a PNG or JPEG file") from None
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
    p.add_argument("--no-resume", action="store_true", help="start afresh even if run-dir has a checkpoint")
    p.add_argument("--no-eval", action="store_true", help="skip COCO evaluation at the end")
    p.add_argument("--device", help="cpu, cuda:0, ... (default: this process's GPU, else CPU)")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=run_train)

    p = cmds.add_parser("eval", help="COCO AP of a checkpoint on the val split of its config")
    p.add_argument("--checkpoint", required=True, help="a run directory or a ckpt_* folder")
    p.add_argument("--config", help="evaluate with this config instead of the checkpoint's")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.add_argument("--device")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_eval)

    add_data_parser(cmds)
    add_bench_parsers(cmds)

    p = cmds.add_parser("predict", help="draw a checkpoint's detections on an image")
    p.add_argument("--checkpoint", required=True, help="a run directory or a ckpt_* folder")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, dotted keys")
    p.set_defaults(func=run_predict)
