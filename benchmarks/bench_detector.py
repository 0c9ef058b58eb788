"""AdaMixer + LORS against AdaMixer at the paper's scale, measured side by side in one run.

ResNet-50, 1333x800 input (padded to 1344x800), 100 queries, random weights (the cost does
not depend on them), float32 at batch 1 on CPU; ``--device cuda --amp bf16 --batch 2`` on a
GPU. For each sampling layout (2 groups x 64 points, the paper's LORS; 4 x 32, AdaMixer's):

(a) a full-model training step (the training loop's own step: forward, set loss with
    matching, backward, gradient clipping, fused AdamW), LORS against vanilla of the same
    layout, and LORS 2x64 against vanilla 4x32 (the paper's pairing, 1.12x on its GPUs);
(b) decoder inference latency on fixed backbone features, LORS (unmerged) against vanilla;
(c) the same for LORS merged (`lors.models.adamixer.merge_detector`) against vanilla;
(d) peak memory of a training step and of full-model inference, each in a fresh process,
    above what the process held before the model was built (`lors.engine.memory.PeakMemory`:
    resident set on CPU, allocated bytes on GPU).

Times are medians over interleaved rounds after warm-up (`lors.engine.timing`); a ratio is
the median of the per-round ratios. Raw numbers go to --out (JSON).

    python benchmarks/bench_detector.py [--repeats 9] [--decoder-repeats 40] [--warmup 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from lors.core.count import count_parameters
from lors.engine.loop import autocast_dtype, train_one_epoch
from lors.engine.memory import PeakMemory
from lors.engine.timing import interleaved, median_ratio, ratio_quartiles
from lors.experiments.detection.train import build_optimizer, detection_loss, schedule
from lors.experiments.report import Column, markdown_table
from lors.experiments.runner import run_in_child
from lors.models.adamixer import (build_criterion, build_detector, load_detector_config, merge_detector,
                                  merged_config)

TARGETS = {"train": 1.10, "merged": 1.02}  # (a) and (c): ratio to vanilla must be <= target
KINDS = ("vanilla", "lors", "merged")


def layout_config(kind: str, layout: str, queries: int):
    """The config of ``kind`` ("vanilla", "lors"; "merged" is built from "lors") at ``layout``
    ("GxP": groups x points)."""
    groups, points = (int(v) for v in layout.split("x"))
    base = "adamixer_r50_1x" if kind == "vanilla" else "adamixer_lors_r50_1x"
    return load_detector_config(base, ["backbone.weights=null", f"decoder.num_groups={groups}",
                                       f"decoder.in_points={points}", f"decoder.num_queries={queries}"])


def build(kind: str, layout: str, queries: int, device: torch.device):
    """(model, config) of ``kind`` at ``layout`` on ``device``, seeded."""
    cfg = layout_config("vanilla" if kind == "vanilla" else "lors", layout, queries)
    torch.manual_seed(0)
    model = build_detector(cfg).to(device)
    if kind == "merged":
        model = merge_detector(model)
    return model, cfg


def fake_batch(batch: int, size: tuple[int, int], boxes: int = 8, seed: int = 0):
    """A collated batch of ``batch`` normalised random images of ``size`` (h, w), padded to a
    multiple of 32, each with ``boxes`` random ground-truth boxes."""
    from lors.data.coco import collate_fn
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    items = []
    for _ in range(batch):
        xy = torch.rand(boxes, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.05 + 0.25 * torch.rand(boxes, 2, generator=gen)) * torch.tensor([w, h])
        target = {"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 80, (boxes,), generator=gen),
                  "size": torch.tensor([float(h), float(w)])}
        items.append((torch.randn(3, h, w, generator=gen), target))
    return collate_fn(items)


class Trainer:
    """One training step of a model, exactly as the training loop takes it."""

    def __init__(self, model, cfg, device: torch.device, batch, amp: str):
        self.model, self.batch = model.train(), batch
        self.loss_fn = detection_loss(build_criterion(cfg), device)
        self.optimizer = build_optimizer(cfg, model)
        self.schedule, self.clip = schedule(cfg, 1), cfg.train.clip_grad
        self.dtype = autocast_dtype(amp, device)

    def __call__(self) -> None:
        train_one_epoch(self.model, self.loss_fn, [self.batch], self.optimizer, self.schedule, 0, 1,
                        dtype=self.dtype, clip_grad=self.clip)


def sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def bench_training(layouts, args, device) -> dict[str, list[float]]:
    """(a): seconds per training step of vanilla and LORS at every layout, all interleaved."""
    batch = fake_batch(args.batch, args.size)
    steps = {}
    for layout in layouts:
        for kind in ("vanilla", "lors"):
            model, cfg = build(kind, layout, args.queries, device)
            steps[f"{kind} {layout}"] = Trainer(model, cfg, device, batch, args.amp)
    return interleaved(steps, args.repeats, args.warmup, sync_for(device), progress="training steps")


def bench_decoder(layout: str, args, device) -> dict[str, list[float]]:
    """(b), (c): seconds of the decoder on fixed features, vanilla, LORS and LORS merged."""
    models = {kind: build(kind, layout, args.queries, device)[0].eval() for kind in KINDS}
    images, sizes, _ = fake_batch(args.batch, args.size)
    images, sizes = images.to(device), sizes.to(device)
    dtype = autocast_dtype(args.amp, device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        features = models["vanilla"].features(images)  # the backbone is the same in all three

        def decode(model):
            return lambda: model.decode(features, sizes)
        return interleaved({k: decode(m) for k, m in models.items()}, args.decoder_repeats, args.warmup,
                           sync_for(device), progress=f"decoder {layout}")


def save_merged(layout: str, queries: int, path: str) -> None:
    """The merged LORS model's weights to ``path`` (run in its own process)."""
    torch.save(build("merged", layout, queries, torch.device("cpu"))[0].state_dict(), path)


def peak_memory(kind: str, layout: str, phase: str, queries: int, batch: int, size, amp: str,
                device: str) -> dict:
    """(d), in a fresh process: the peak memory of one ``phase`` ("train": a training step, after
    one untimed step so the optimizer's state exists; "infer": full-model inference), above what
    the process held before the model was built; and the parameter counts."""
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "merged":  # as a user serves it: the merged checkpoint loaded into a fresh process
            path = Path(tmp) / "merged.pt"
            run_in_child(save_merged, (layout, queries, str(path)))  # before the baseline: not counted
        with PeakMemory(dev, release_freed=True) as before:
            pass
        if kind == "merged":
            cfg = merged_config(layout_config("lors", layout, queries))
            model = build_detector(cfg).to(dev)
            model.load_state_dict(torch.load(path, map_location=dev, weights_only=True))
        else:
            model, cfg = build(kind, layout, queries, dev)
    data = fake_batch(batch, size)
    out = {"params": count_parameters(model).total, "decoder_params": count_parameters(model.decoder).total}
    if phase == "train":
        run = Trainer(model, cfg, dev, data, amp)
    else:
        model.eval()
        images, sizes = data[0].to(dev), data[1].to(dev)
        dtype = autocast_dtype(amp, dev)

        def run():
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                model(images, sizes)
    run()
    with PeakMemory(dev, release_freed=True) as mem:  # what the first run freed does not count
        run()
    out[f"{phase}_peak_mib"] = mem.peak_mib - before.start_mib
    return out


def summarise(train_times, decoder_times, memory, layouts) -> list[dict]:
    """The table's rows: one per layout and kind, times in ms, ratios to vanilla."""
    rows = []
    for layout in layouts:
        dec = decoder_times[layout]
        for kind in KINDS:
            row = {"layout": layout, "kind": kind, **memory.get(f"{kind} {layout}", {})}
            key = f"{kind} {layout}"
            if key in train_times:
                base = train_times[f"vanilla {layout}"]
                row["train_ms"] = 1e3 * statistics.median(train_times[key])
                row["train_ratio"] = median_ratio(train_times[key], base)
                row["train_ratio_quartiles"] = ratio_quartiles(train_times[key], base)
            row["decoder_ms"] = 1e3 * statistics.median(dec[kind])
            row["decoder_ratio"] = median_ratio(dec[kind], dec["vanilla"])
            row["decoder_ratio_quartiles"] = ratio_quartiles(dec[kind], dec["vanilla"])
            rows.append(row)
    return rows


def verdicts(rows, train_times) -> list[str]:
    lines = []
    for row in rows:
        if row["kind"] == "lors" and "train_ratio" in row:
            ok = row["train_ratio"] <= TARGETS["train"]
            lines.append(f"(a) training step, LORS {row['layout']} / vanilla {row['layout']}: "
                         f"{row['train_ratio']:.3f} (goal <= {TARGETS['train']:.2f}: {'met' if ok else 'MISSED'})")
        if row["kind"] == "lors":
            lines.append(f"(b) decoder, LORS unmerged {row['layout']} / vanilla: {row['decoder_ratio']:.3f}")
        if row["kind"] == "merged":
            ok = row["decoder_ratio"] <= TARGETS["merged"]
            lines.append(f"(c) decoder, LORS merged {row['layout']} / vanilla: {row['decoder_ratio']:.3f} "
                         f"(goal <= {TARGETS['merged']:.2f}: {'met' if ok else 'MISSED'})")
    if "lors 2x64" in train_times and "vanilla 4x32" in train_times:
        paper = median_ratio(train_times["lors 2x64"], train_times["vanilla 4x32"])
        lines.append(f"(a) the paper's pairing, LORS 2x64 / vanilla 4x32: {paper:.3f} (paper: 1.12 on its GPUs)")
    return lines


def table(rows) -> str:
    def cell(key, spec):
        return lambda r: "–" if r.get(key) is None else format(r[key], spec)

    def ratio(key):  # the median, and the per-round ratios' quartiles
        return lambda r: "–" if r.get(key) is None else (
            f"{r[key]:.3f} [{r[key + '_quartiles'][0]:.2f}, {r[key + '_quartiles'][1]:.2f}]")
    columns = [Column("Layout", lambda r: r["layout"]), Column("Model", lambda r: r["kind"]),
               Column("Decoder params", cell("decoder_params", ",")),
               Column("Train step ms", cell("train_ms", ",.0f")), Column("(a) ratio [quartiles]", ratio("train_ratio")),
               Column("Decoder ms", cell("decoder_ms", ".1f")), Column("(b)/(c) ratio [quartiles]", ratio("decoder_ratio")),
               Column("(d) train peak MiB", cell("train_peak_mib", ",.0f")),
               Column("(d) inference peak MiB", cell("infer_peak_mib", ",.0f"))]
    return markdown_table(rows, columns)


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size is HxW, e.g. 800x1333, got {text!r}") from None
    return h, w


def parse_layout(text: str) -> str:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a layout is GROUPSxPOINTS, e.g. 2x64, got {text!r}")
    return text.lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", type=parse_layout, default=["2x64", "4x32"])
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds of training steps")
    parser.add_argument("--decoder-repeats", type=int, default=40, help="timed rounds of decoder runs")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=parse_size, default=(800, 1333), help="image HxW before padding")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--no-memory", action="store_true", help="skip (d), the fresh-process memory runs")
    parser.add_argument("--out", default="docs/results/performance.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.decoder_repeats < 1 or args.batch < 1 or args.queries < 1:
        parser.error("--repeats, --decoder-repeats, --batch and --queries must be >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: {args.device!r} is not a device; use cpu or cuda (cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to torch here; use --device cpu")

    decoder_times = {layout: bench_decoder(layout, args, device) for layout in args.layouts}
    train_times = bench_training(args.layouts, args, device)
    memory = {}
    if not args.no_memory:
        for layout in args.layouts:
            for kind in KINDS:
                for phase in ("train", "infer") if kind != "merged" else ("infer",):  # merged: for inference
                    print(f"peak memory: {kind} {layout}, {phase} (own process)", flush=True)
                    memory.setdefault(f"{kind} {layout}", {}).update(run_in_child(
                        peak_memory, (kind, layout, phase, args.queries, args.batch, args.size, args.amp,
                                      args.device), threads=torch.get_num_threads()))
    rows = summarise(train_times, decoder_times, memory, args.layouts)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    machine = (f"{gpu or platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads, "
               f"torch {torch.__version__}, {args.amp}, batch {args.batch}")
    print(f"\nmachine: {machine}; image {args.size[0]}x{args.size[1]}, {args.queries} queries; medians of "
          f"{args.repeats} (training) / {args.decoder_repeats} (decoder) interleaved rounds after {args.warmup} warm-up")
    print(table(rows))
    lines = verdicts(rows, train_times)
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "out"},
                               "rows": rows, "verdicts": lines,
                               "raw_seconds": {"training": train_times, "decoder": decoder_times}}, indent=2))
    print(f"raw numbers: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
