"""`lors detect`: train, evaluate and run the AdaMixer (+ LORS) detector."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lors.commands.detect_bench import add_bench_parsers
from lors.commands.detect_data import add_data_parser
from lors.config import load_config


def _config(args: argparse.Namespace):
    from lors.models.adamixer import load_detector_config
    return load_detector_config(args.config, args.overrides)


def _checkpoint_config(path: str, overrides=()):
    """The DetectorConfig and state stored with a checkpoint (folder or run directory)."""
    from lors.engine.checkpoint import find_checkpoint, read_state
    from lors.models.adamixer import DetectorConfig
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{path} holds no checkpoint (no state.json or last.json): pass a run "
                         "directory written by `lors detect train` or one of its ckpt_* folders")
    state = read_state(ckpt)
    return ckpt, load_config(DetectorConfig, state["config"], overrides), state


def run_train(args: argparse.Namespace) -> int:
    from lors.engine.train import train
    cfg = _config(args)
    summary = train(cfg, run_dir=args.run_dir, resume=not args.no_resume, device=args.device,
                    evaluate_at_end=not args.no_eval)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lors.engine.checkpoint import load_checkpoint
    from lors.engine.distributed import init_distributed
    from lors.engine.train import build_datasets, evaluate
    from lors.models.adamixer import build_detector
    if args.config:
        cfg = _config(args)
        ckpt, _, _ = _checkpoint_config(args.checkpoint)
    else:
        ckpt, cfg, _ = _checkpoint_config(args.checkpoint, args.overrides)
    _, _, dev = init_distributed(args.device)
    model = build_detector(cfg).to(dev)
    load_checkpoint(ckpt, model)
    _, val_set = build_datasets(cfg, train=False)
    metrics = evaluate(model, val_set, cfg, dev, verbose=not args.json)
    print(json.dumps(metrics, indent=2) if args.json else
          "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from lors.data.transforms import make_coco_transforms
    from lors.engine.checkpoint import load_checkpoint
    from lors.models.adamixer import PostProcess, build_detector
    from lors.plots import draw_detections
    ckpt, cfg, state = _checkpoint_config(args.checkpoint, args.overrides)
    path = Path(args.image)
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path} ({err}): pass a PNG or JPEG file") from None
    model = build_detector(cfg).eval()
    load_checkpoint(ckpt, model)
    tensor, _ = make_coco_transforms(False, (cfg.data.min_size,), cfg.data.max_size)(image, {"boxes": torch.zeros(0, 4)})
    size = torch.tensor([tensor.shape[-2:]])
    pad_h, pad_w = (-size[0, 0]) % 32, (-size[0, 1]) % 32
    batch = torch.nn.functional.pad(tensor, (0, int(pad_w), 0, int(pad_h)))[None]
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
