"""Seconds per uptraining step of a converted causal LM for each healing option of `lors convert`,
measured side by side in one run.

A step is what `lors convert --uptrain-steps` runs in the engine's `fit`: forward (and the
original's, for distillation), backward, gradient clipping and AdamW, through
`lors.engine.loop.train_one_epoch` on one batch, with the loss of `uptrain.loss_function`, the
tensors of `uptrain.trainable_parameters` and the autocast of `RunSettings.amp`. Every variant
steps the same converted model (the `lors convert` default form at ``--budget``, weight-space
SVD: the step's cost does not depend on the calibration) on ``--tokens`` random token ids a step
(windows of 256 come twice as many as windows of 512, so the ratios are per token), interleaved
by `lors.engine.timing.interleaved`. Ratios are to today's default, fp32 / distill / converted
at the longest window; the raw seconds go to ``--out``.

    python benchmarks/uptrain_step.py                                    # tiny random Llama: runs in seconds
    python benchmarks/uptrain_step.py --model smollm2 --repeats 5        # SmolLM2-135M, every combination
    python benchmarks/uptrain_step.py --model smollm2 --amp bf16 --loss lm distill --params converted \\
        --seq-lens 512                                                   # a subset
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import sys
from pathlib import Path

import torch


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), which decides the CPU floats and speeds."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "cpu"
    return next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "cpu")


def tiny_llama() -> torch.nn.Module:
    """A random Llama small enough to step in milliseconds, with SmolLM2's shape of block."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def converted(name: str, budget: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(student, teacher): ``name`` ("tiny" or "smollm2") converted at ``budget``, and the original."""
    from lors.experiments.convert.run import ConvertSettings, convert_pretrained
    from lors.models.pretrained import CAUSAL, Pretrained, load_pretrained
    model = tiny_llama() if name == "tiny" else load_pretrained(name).model
    teacher = copy.deepcopy(model)
    convert_pretrained(Pretrained(model, None, CAUSAL, name), ConvertSettings(budget=budget, calib_tokens=0))
    return model, teacher


def step_fns(student, teacher, variants, tokens: int, vocab: int) -> dict:
    """One callable per variant (amp, loss, params, seq_len): one uptraining step each."""
    from lors.engine.loop import adamw, autocast_dtype, train_one_epoch
    from lors.engine.schedule import Schedule
    from lors.experiments.convert.uptrain import UptrainSettings, loss_function, trainable_parameters
    everything = {id(p) for p in trainable_parameters(student, "all")}
    for p in student.parameters():
        p.requires_grad_(id(p) in everything)
    optimizer = adamw(student, 1e-5, 0.0)  # over every tensor "all" trains; AdamW skips those without a gradient
    schedule = Schedule(lr=1e-5, total_steps=1 << 30)
    g = torch.Generator().manual_seed(0)
    fns = {}
    for amp, loss, params, seq_len in variants:
        settings = UptrainSettings(loss=loss, params=params, amp=amp).validate()
        ids = torch.randint(vocab, (max(1, tokens // seq_len), seq_len), generator=g)
        keep = {id(p) for p in trainable_parameters(student, params)}

        def step(loss_fn=loss_function(settings, teacher), keep=keep, ids=ids,
                 dtype=autocast_dtype(amp, torch.device("cpu"))):
            for p in student.parameters():
                p.requires_grad_(id(p) in keep)
            train_one_epoch(student, loss_fn, [ids], optimizer, schedule, 0, 1, dtype=dtype, clip_grad=1.0)
        fns[f"{amp} {loss} {params} {seq_len}"] = step
    return fns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--budget", type=float, default=0.5, help="fraction of the blocks' Linear parameters kept")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step (default 1024)")
    parser.add_argument("--amp", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--loss", nargs="+", default=["distill", "lm"])
    parser.add_argument("--params", nargs="+", default=["converted", "all"])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="raw seconds as JSON (default runs/bench/uptrain_step_MODEL.json)")
    args = parser.parse_args(argv)
    from lors.engine.timing import interleaved, median_ratio, ratio_quartiles
    if any(args.tokens < s for s in args.seq_lens):
        parser.error(f"--tokens {args.tokens} holds no window of {max(args.seq_lens)}: raise it")
    student, teacher = converted(args.model, args.budget)
    variants = list(itertools.product(args.amp, args.loss, args.params, sorted(args.seq_lens, reverse=True)))
    fns = step_fns(student, teacher, variants, args.tokens, student.config.vocab_size)
    times = interleaved(fns, repeats=args.repeats, warmup=args.warmup, progress="uptrain steps")
    base = next(iter(fns))  # fp32 distill converted at the longest window when all are asked for
    from lors.engine.loop import cpu_has_bf16
    machine = (f"{platform.machine()}, {cpu_name()} with {torch.backends.cpu.get_cpu_capability()}"
               f" (native bfloat16: {'yes' if cpu_has_bf16() else 'no'}), {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}")
    print(f"{args.model} at {args.budget:.0%}: one uptraining step of {args.tokens} tokens, median of "
          f"{args.repeats} ({machine}); ratio to {base!r} (first and third quartiles)")
    print(f"{'amp loss params window':<32}{'s / step':>10}{'ratio':>8}  quartiles")
    for name, t in times.items():
        q1, q3 = ratio_quartiles(t, times[base])
        print(f"{name:<32}{statistics.median(t):>10.4f}{median_ratio(t, times[base]):>8.3f}  {q1:.3f}-{q3:.3f}")
    out = Path(args.out or f"runs/bench/uptrain_step_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(model=args.model, budget=args.budget, tokens=args.tokens, machine=machine,
                                   repeats=args.repeats, warmup=args.warmup, seconds=times), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
