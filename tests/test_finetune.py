"""The fine-tuning comparison on a tiny random BERT and made-up fortune files (no MiniLM, no apt data)."""
import json
import re

import pytest
import torch

from lors.cli import main
from lors.data.text import FORTUNES_DIR, load_fortunes, read_fortune_file
from lors.experiments.finetune import sweep as exp
from lors.engine.loop import NonFiniteLossError
from lors.experiments.finetune import run as run_module
from lors.experiments.finetune import (METHODS, FinetuneConfig, FinetuneSweep, finetune, length_grouped_batches,
                                       load_sweep, lr_schedule, plan)

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

WORDS = ["cpu", "disk", "bug", "bread", "soup", "cake", "judge", "court", "lawyer"]


def write_fortunes(root, per_class: int = 6) -> None:
    for c, words in (("computers", WORDS[:3]), ("food", WORDS[3:6]), ("law", WORDS[6:])):
        entries = [f"{words[i % 3]} {words[(i + 1) % 3]} number {i}\n  second line" for i in range(per_class)]
        entries.append("shared entry")  # in every file: has no single label, must be dropped
        (root / c).write_text("\n%\n".join(entries) + "\n%\n")


def tiny_loader(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "number", "second", "line",
                                *WORDS, *map(str, range(10))]))

    def load():
        torch.manual_seed(0)
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
        cfg = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64)
        return transformers.BertModel(cfg, add_pooling_layer=False), tok
    return load


def test_fortune_split_is_balanced_disjoint_and_drops_shared_entries(tmp_path):
    write_fortunes(tmp_path)
    assert read_fortune_file(tmp_path / "food")[0] == "bread soup number 0 second line"
    train, test = load_fortunes(("computers", "food", "law"), 4, 2, root=tmp_path)
    assert train.labels == [0] * 4 + [1] * 4 + [2] * 4 and test.labels == [0] * 2 + [1] * 2 + [2] * 2
    assert not set(train.texts) & set(test.texts)
    assert "shared entry" not in train.texts + test.texts
    with pytest.raises(ValueError, match="fewer than 5 \\+ 2"):
        load_fortunes(("computers", "food", "law"), 5, 2, root=tmp_path)
    with pytest.raises(ValueError, match="apt-get install fortunes"):
        load_fortunes(("computers",), root=tmp_path / "missing")


def test_length_grouped_batches_cover_each_example_once():
    lengths = torch.randint(1, 64, (50,))
    batches = length_grouped_batches(lengths, 8, torch.Generator().manual_seed(0), group=2)
    assert sorted(torch.cat(batches).tolist()) == list(range(50))
    assert all(len(b) <= 8 for b in batches)


def test_epoch_order_is_the_earlier_loops_order_from_the_seed_and_epoch_alone():
    lengths = torch.randint(1, 64, (50,))
    gen = torch.Generator().manual_seed(3)  # the earlier loop: one generator, batches popped off each epoch's list
    for epoch in range(3):
        batches = length_grouped_batches(lengths, 8, gen)
        popped = [batches.pop() for _ in range(len(batches))]
        order = run_module.epoch_order(lengths, 8, 3, epoch)
        assert len(order) == len(popped) and all(torch.equal(a, b) for a, b in zip(order, popped))


def test_three_methods_train_and_serial_is_a_quarter_of_lora(tmp_path):
    write_fortunes(tmp_path)
    train, test = load_fortunes(("computers", "food", "law"), 4, 2, root=tmp_path)
    out = {m: finetune(FinetuneConfig(method=m, rank=4, steps=3, batch_size=4, max_len=16), train, test,
                       progress=False, load=tiny_loader(tmp_path))
           for m in ("full", "lora", "serial-lora")}
    assert out["serial-lora"]["adapter_params"] * 4 == out["lora"]["adapter_params"] == 2 * 4 * 2 * 32 * 4
    assert out["full"]["adapter_params"] > out["lora"]["adapter_params"]
    head = 32 * 3 + 3
    assert all(r["trainable_params"] - r["adapter_params"] == head for r in out.values())
    assert all(0.0 <= r["accuracy"] <= 100.0 and r["train_time_s"] > 0 for r in out.values())


def test_report_plot_and_command_line(tmp_path):
    runs = [{"method": m, "rank": r, "seed": s, "adapter_params": p, "trainable_params": p + 10,
             "accuracy": a + s, "train_time_s": 1.0, "peak_mem_mib": 5.0}
            for m, r, p, a in (("full", 8, 1000, 90.0), ("lora", 4, 400, 80.0), ("serial-lora", 4, 100, 79.5))
            for s in (0, 1)]
    meta = {"command": "lors finetune ...", "machine": "CPU, 2 cores", "seeds": [0, 1], "classes": ["a", "b"],
            "train_size": 4, "test_size": 2, "steps": 3, "batch_size": 2, "max_len": 8, "lr": 1e-3, "head_lr": 1e-3,
            "alpha": 8, "lora_plus_ratio": 1.0}
    exp.write_plot(exp.summarize(runs), tmp_path / "p.png")
    exp.write_report(runs, meta, tmp_path / "r.md", tmp_path / "p.png")
    text = (tmp_path / "r.md").read_text()
    assert "| serial-lora | 4 | 100 |" in text and "**80.00**" in text
    assert "0.25 of LoRA's 400" in text and "(-0.50 points" in text and "at most 1 point below" in text
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    line = exp.command_line("minilm_fortunes", ["methods=[lora]", "ranks=[4]", "steps=10"], seeds=[0],
                            json_path="x.json")
    assert line.startswith("lors finetune --config minilm_fortunes 'methods=[lora]' 'ranks=[4]' steps=10 --seeds 0")
    assert line.endswith("--json x.json")


def test_sweep_prints_a_line_per_run_and_writes_json_report_and_plot(tmp_path, monkeypatch, capsys):
    from lors.experiments import runner
    write_fortunes(tmp_path)
    monkeypatch.setattr(exp, "CATEGORIES", ("computers", "food", "law"))
    monkeypatch.setattr(exp, "load_minilm", tiny_loader(tmp_path))  # in this process: the runs are not isolated
    monkeypatch.setattr(exp, "run_jobs", lambda jobs, **kw: runner.run_jobs(jobs, **{**kw, "isolate": False}))
    overrides = [f"data_dir={tmp_path}", "train_per_class=4", "test_per_class=2", "steps=2", "batch_size=4",
                 "max_len=16", "ranks=[4,2]"]
    out = {k: tmp_path / f"out.{k}" for k in ("json", "md", "png")}
    results = exp.run_sweep("minilm_fortunes", overrides, seeds=[0], json_path=out["json"], report=out["md"],
                            plot=out["png"], runs_dir=tmp_path / "runs")
    assert [(r["method"], r["rank"]) for r in results] == [("full", 4), ("lora", 4), ("serial-lora", 4),
                                                           ("lora", 2), ("serial-lora", 2)]
    printed = capsys.readouterr().out
    assert "[1/5] full        rank  4 seed 0: acc " in printed and "[5/5] serial-lora rank  2 seed 0" in printed
    saved = json.loads(out["json"].read_text())
    assert len(saved["runs"]) == 5 and saved["meta"]["sweep"]["ranks"] == [4, 2]
    report = out["md"].read_text()
    assert f"- Command: `lors finetune --config minilm_fortunes data_dir={tmp_path}" in report
    assert "'ranks=[4,2]' --seeds 0 --device cpu" in report and "| serial-lora | 2 |" in report
    assert out["png"].read_bytes()[:4] == b"\x89PNG"
    runs = sorted((tmp_path / "runs").iterdir())  # a folder per run; a finished one keeps no checkpoint
    assert len(runs) == 5 and all(re.fullmatch(r"(full|lora|serial-lora)-r[24]-s0-[0-9a-f]{10}", r.name) for r in runs)
    assert all((r / "result.json").is_file() and (r / "log.csv").is_file() and not list(r.glob("ckpt_*"))
               for r in runs)
    monkeypatch.setattr(exp, "load_minilm", lambda: pytest.fail("trained a finished run again"))
    assert exp.run_sweep("minilm_fortunes", overrides, seeds=[0], runs_dir=tmp_path / "runs") == results


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    write_fortunes(tmp_path)
    train, test = load_fortunes(("computers", "food", "law"), 4, 2, root=tmp_path)  # 3 batches of 4 an epoch
    built = []
    build = run_module.build_classifier
    monkeypatch.setattr(run_module, "build_classifier", lambda *a: built.append(build(*a)) or built[-1])
    cfg = FinetuneConfig(method="serial-lora", rank=4, steps=7, batch_size=4, max_len=16)  # dropout 0.1 on
    kw = {"progress": False, "load": tiny_loader(tmp_path)}
    whole = finetune(cfg, train, test, run_dir=tmp_path / "whole", **kw)
    assert finetune(cfg, train, test, run_dir=tmp_path / "parts", stop_after=4, **kw) is None  # in epoch 1
    assert (tmp_path / "parts" / "ckpt_00000004").is_dir()
    resumed = finetune(cfg, train, test, run_dir=tmp_path / "parts", **kw)
    first, last = built[0].state_dict(), built[2].state_dict()
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
    assert (resumed["accuracy"], resumed["final_loss"]) == (whole["accuracy"], whole["final_loss"])
    log = (tmp_path / "parts" / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == [str(s) for s in range(1, 8)]
    # finished: the checkpoints are gone, the result stays and is returned without training again
    assert not list((tmp_path / "parts").glob("ckpt_*")) and (tmp_path / "parts" / "result.json").is_file()
    again = finetune(cfg, train, test, run_dir=tmp_path / "parts", progress=False,
                     load=lambda: pytest.fail("trained a finished run again"))
    assert again == resumed
    with pytest.raises(ValueError, match="holds a finished run with other settings \\(finetune.lr 0.001 -> 0.002"):
        finetune(FinetuneConfig(method="serial-lora", rank=4, steps=7, batch_size=4, max_len=16, lr=2e-3), train,
                 test, run_dir=tmp_path / "parts", **kw)
    with pytest.raises(ValueError, match="stop_after=2 needs a run_dir"):
        finetune(cfg, train, test, stop_after=2, **kw)


def test_a_nan_loss_stops_the_run_with_the_engine_error(tmp_path, monkeypatch):
    write_fortunes(tmp_path)
    train, test = load_fortunes(("computers", "food", "law"), 4, 2, root=tmp_path)
    calls = []
    cross_entropy = torch.nn.functional.cross_entropy

    def nan_at_the_third_step(*args, **kwargs):
        calls.append(1)
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_at_the_third_step)
    cfg = FinetuneConfig(method="lora", rank=4, steps=6, batch_size=4, max_len=16)
    kw = {"progress": False, "load": tiny_loader(tmp_path)}
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2 \\(epoch 0\\); the last checkpoint in .*run "
                                                 "is intact\\. Lower lr \\(or head_lr\\)"):
        finetune(cfg, train, test, run_dir=tmp_path / "run", checkpoint_every=1, **kw)
    assert len(calls) == 3  # no step after it
    assert (tmp_path / "run" / "ckpt_00000002").is_dir() and not (tmp_path / "run" / "result.json").exists()
    calls.clear()
    with pytest.raises(NonFiniteLossError, match="^loss is nan at step 2 of lora rank 4 seed 0\\. Lower lr"):
        finetune(cfg, train, test, **kw)  # a temporary folder: no checkpoint is named


def test_preset_loads_and_overrides_apply():
    sweep = load_sweep("minilm_fortunes")
    assert sweep.methods == list(METHODS) and sweep.ranks == [8] and sweep.alpha is None and sweep.lr is None
    assert (sweep.steps, sweep.batch_size, sweep.max_len, sweep.head_lr) == (150, 16, 64, 1e-3)
    assert (sweep.train_per_class, sweep.test_per_class, sweep.data_dir) == (64, 80, str(FORTUNES_DIR))
    sweep = load_sweep("minilm_fortunes", ["methods=[lora,serial-lora]", "ranks=[8,4]", "lr=3e-3", "adapt_out=true"])
    assert sweep.methods == ["lora", "serial-lora"] and sweep.ranks == [8, 4] and sweep.lr == 3e-3 and sweep.adapt_out


def test_sweep_plan_is_rank_major_with_full_once():
    runs = plan(FinetuneSweep(ranks=[8, 4]), seeds=[0, 1])
    assert [(c.method, c.rank, c.seed) for c in runs] == [
        ("full", 8, 0), ("full", 8, 1), ("lora", 8, 0), ("lora", 8, 1), ("serial-lora", 8, 0), ("serial-lora", 8, 1),
        ("lora", 4, 0), ("lora", 4, 1), ("serial-lora", 4, 0), ("serial-lora", 4, 1)]
    assert [c.alpha for c in runs] == [16.0] * 6 + [8.0] * 4  # alpha: null is 2 x rank
    assert runs[0].lr == 5e-5 and runs[2].lr == 1e-3


@pytest.mark.parametrize("override, message", [
    ("methods=[nope]", "unknown method 'nope' in methods"),
    ("ranks=[0]", "ranks \\[0\\] must hold at least one rank, each at least 1"),
    ("methods=[]", "methods is empty"),
    ("steps=0", "steps 0 must be at least 1"),
    ("lr=-1", "lr -1.0 must be positive"),
    ("rank=8", "unknown config key 'rank'"),
])
def test_bad_sweep_is_refused_before_anything_loads(monkeypatch, override, message):
    with pytest.raises(ValueError, match=message):
        load_sweep("minilm_fortunes", [override])
    monkeypatch.setattr(exp, "load_fortunes", lambda **kw: pytest.fail("loaded data for a bad config"))
    monkeypatch.setattr(exp, "run_jobs", lambda *a, **kw: pytest.fail("ran a bad config"))
    with pytest.raises(ValueError, match=message):
        exp.run_sweep("minilm_fortunes", [override])


def test_bad_override_on_the_command_line_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(exp, "load_fortunes", lambda **kw: pytest.fail("loaded data for a bad config"))
    assert main(["finetune", "ranks=[0]", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lors finetune: error: ranks [0] must hold at least one rank") and "Traceback" not in err


def test_schedule_warms_up_then_decays_to_zero():
    cfg = FinetuneConfig(method="lora", steps=150, warmup=0.1)  # lr 1e-3, 15 warm-up steps
    schedule = lr_schedule(cfg)
    rates = [schedule(s) for s in range(cfg.steps + 1)]
    assert 0 < rates[0] < 0.1 * cfg.lr
    assert all(a < b for a, b in zip(rates[:15], rates[1:16]))  # warm-up: rising to the full rate
    assert rates[15] == pytest.approx(cfg.lr)
    assert all(a > b for a, b in zip(rates[15:], rates[16:]))  # then falling
    assert rates[-1] == 0.0 and 0 < rates[-2] < 0.01 * cfg.lr  # to 0 at the last step
    old = [cfg.lr * min((s + 1) / 15, (150 - s) / 135) for s in range(150)]  # the LambdaLR it replaced
    assert rates[15:150] == pytest.approx(old[15:])
    assert max(abs(a - b) for a, b in zip(rates, old)) < 0.065 * cfg.lr  # steps 1-14 only


def test_schedule_keeps_each_groups_own_rate():
    cfg = FinetuneConfig(method="lora", steps=10, lr=1e-3, head_lr=1e-2)
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": cfg.lr},
                             {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": cfg.head_lr}])
    lr_schedule(cfg).scale_groups(opt, 5)
    assert opt.param_groups[1]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])


def test_serial_lora_runs_through_the_peft_front_door_with_the_native_parameter_count(tmp_path):
    pytest.importorskip("lors.adapters.peft")
    import peft

    from lors.adapters import serial_lora
    from lors.experiments.finetune import build_classifier
    load = tiny_loader(tmp_path)
    cfg = FinetuneConfig(method="serial-lora", rank=4)
    model = build_classifier(cfg, load()[0], num_classes=3)
    assert isinstance(model.encoder, peft.PeftModel)
    native = load()[0]
    serial_lora.inject(native, cfg.rank, cfg.alpha)
    wrapped = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    assert wrapped == serial_lora.trainable_parameters(native) == 2 * 2 * 32 * 4  # 2 blocks, A and B
