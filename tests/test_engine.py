"""The engine's one schedule, one memory measure and the loop on a toy model."""
import math
from pathlib import Path
import warnings

import pytest
import torch
from torch import nn

from lors.engine.loop import NonFiniteLossError, train_one_epoch
from lors.engine.memory import PeakMemory
from lors.engine.schedule import Schedule


def test_step_decay_with_warmup_is_the_detectors_1x_schedule():
    s = Schedule(lr=1e-4, total_steps=120, warmup_steps=10, warmup_start=0.001, decay="step",
                 milestones=(80, 110), gamma=0.1)
    assert s(0) == 1e-4 * 0.001
    assert s(5) == 1e-4 * (0.001 + 0.999 * 5 / 10)
    assert s(10) == s(79) == 1e-4
    assert s(80) == pytest.approx(1e-5) and s(110) == pytest.approx(1e-6)


def test_linear_decay_holds_during_warmup_and_ends_at_zero():
    s = Schedule(lr=1.0, total_steps=100, warmup_steps=10, decay="linear")
    rates = [s(t) for t in range(101)]
    assert rates[0] == 0.0 and rates[10] == 1.0 and rates[100] == 0.0
    assert all(a <= b for a, b in zip(rates[:10], rates[1:11]))  # warm-up rises
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))   # then decays


def test_cosine_decay_halves_at_midpoint():
    s = Schedule(lr=2.0, total_steps=100, decay="cosine")
    assert s(0) == 2.0 and s(50) == pytest.approx(1.0) and s(100) == pytest.approx(0.0)


def test_constant_decay_after_warmup_does_not_depend_on_the_runs_length():
    short, long = (Schedule(lr=1.0, total_steps=n, warmup_steps=4, decay="constant") for n in (10, 1000))
    assert [short(t) for t in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert [short(t) for t in range(10)] == [long(t) for t in range(10)]
    assert {long(t) for t in range(4, 1000)} == {1.0}


def test_scale_groups_keeps_each_groups_ratio_and_rejects_unknown_decays():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-2}])
    s = Schedule(lr=1e-3, total_steps=10, decay="cosine")
    for step in (0, 3, 7):
        s.scale_groups(opt, step)
        assert opt.param_groups[1]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.7)))
    with pytest.raises(ValueError, match="unknown learning-rate decay 'exp'"):
        Schedule(lr=1.0, total_steps=10, decay="exp")


def test_peak_memory_sees_a_block_and_forgets_earlier_peaks():
    big = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    del big
    with PeakMemory("cpu") as quiet:
        pass
    with PeakMemory("cpu", release_freed=True) as busy:  # freed heap that earlier tests left could serve it
        block = torch.ones(128 * 2**20 // 4)
        del block
    assert busy.growth_mib > 100, busy.growth_mib
    assert quiet.growth_mib < 50, quiet.growth_mib  # the earlier 256 MiB peak is not this block's


def test_peak_memory_can_leave_out_heap_memory_that_earlier_work_freed():
    """Small blocks freed between live ones stay in the process (the heap cannot shrink past
    them); with release_freed they are handed back before the block, so its start is live memory."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("resident set from /proc: Linux only")
    blocks = [torch.ones(16 * 1024) for _ in range(4096)]  # 4096 x 64 KiB = 256 MiB, touched
    del blocks[::2]  # 128 MiB freed in holes between live blocks
    with PeakMemory("cpu") as kept:
        pass
    with PeakMemory("cpu", release_freed=True) as released:
        pass
    del blocks
    assert kept.start_mib - released.start_mib > 64, (kept.start_mib, released.start_mib)


def test_interleaved_timing_rotates_the_order_and_keeps_rounds_aligned():
    from lors.engine.timing import interleaved, median_ratio, ratio_quartiles
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
                         "c": lambda: calls.append("c")}, repeats=4, warmup=2)
    assert calls[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # who goes first rotates
    assert len(calls) == 18 and {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0  # median of per-round ratios
    assert ratio_quartiles([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5) == (2.0, 4.0)
    with pytest.raises(ValueError, match="repeats"):
        interleaved({"a": lambda: None}, repeats=0)


def test_train_one_epoch_steps_until_the_budget_and_stops_on_a_nan():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(5)]

    def loss_fn(m, batch):
        x, y = batch
        loss = ((m(x) - y) ** 2).mean()
        return loss, {"mse": loss.item()}

    seen = []
    step = train_one_epoch(model, loss_fn, batches, opt, Schedule(lr=0.1, total_steps=3), 0, 3,
                           on_step=lambda *a: seen.append(a[0]))
    assert step == 3 and seen == [1, 2, 3]
    before = [p.detach().clone() for p in model.parameters()]
    bad = [(torch.full((4, 3), float("nan")), torch.zeros(4, 1))]
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3"):
        train_one_epoch(model, loss_fn, bad, opt, Schedule(lr=0.1, total_steps=9), 3, 9)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # no bad step taken


def test_adamw_decays_weights_only_also_a_lors_stacks_per_layer_biases_not():
    from lors import share_layers
    from lors.engine.loop import adamw
    stack = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)) for _ in range(3)))
    share_layers(stack, rank=2)
    opt = adamw(stack, 1e-3, 0.1)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n: p for n, p in stack.named_parameters()}
    lors_bias = next(p for n, p in names.items() if n.startswith("lors.") and n.endswith(".bias"))
    assert lors_bias.dim() == 2 and id(lors_bias) not in decayed
    assert id(next(p for n, p in names.items() if n.endswith("shared_weight"))) in decayed
    assert not any(id(p) in decayed for n, p in names.items() if p.dim() < 2)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def _toy_fit(run_dir, amp="fp32", stop_after=None, steps=4, loss_fn=None):
    from lors.engine.loop import RunSettings, adamw, fit
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    data = torch.randn(steps, 2, 4, generator=torch.Generator().manual_seed(0))

    def batches(epoch, start):
        return (data[s] for s in range(start, steps))

    loss_fn = loss_fn or (lambda m, x: (m(x).pow(2).mean(), {}))
    settings = RunSettings(run_dir=run_dir, config={"train": {"steps": steps}}, length_key="train.steps",
                           checkpoint_every=2, amp=amp, stop_after=stop_after, progress=False)
    return fit(model, loss_fn, batches, steps, adamw(model, 1e-3, 0.0), Schedule(lr=1e-3, total_steps=steps),
               settings)


def test_fp16_resume_restores_the_gradient_scalers_loss_scale(tmp_path):
    import json
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _toy_fit(whole, amp="fp16", steps=6)
    _toy_fit(cut, amp="fp16", steps=6, stop_after=2)
    _toy_fit(cut, amp="fp16", steps=6)
    scale = [json.loads((run / "ckpt_00000006" / "state.json").read_text())["grad_scaler"] for run in (whole, cut)]
    assert scale[0] == scale[1] and scale[0]["scale"] < 65536.0  # it backed off, and resumed where it was
    assert (whole / "log.csv").read_text().count("\n") == 7
    rows = [[r.split(",")[:4] for r in (run / "log.csv").read_text().splitlines()] for run in (whole, cut)]
    assert rows[0] == rows[1]


def test_the_log_files_are_closed_when_a_run_fails(tmp_path, monkeypatch):
    from lors.engine import loop
    closed = []
    monkeypatch.setattr(loop.RunLog, "close", lambda self: (closed.append(True), self.file.close()))

    def bad(m, x):
        return m(x).sum() * float("nan"), {}

    with pytest.raises(NonFiniteLossError):
        _toy_fit(tmp_path / "run", loss_fn=bad)
    assert closed == [True]


def test_eval_steps_write_a_val_row_after_each_listed_step_and_the_end(tmp_path):
    from lors.engine.loop import RunSettings, adamw, fit
    model = nn.Linear(4, 1)
    data = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(0))
    seen = []

    def evaluate():
        seen.append(float(model.weight.detach().sum()))
        return {"score": seen[-1]}
    settings = RunSettings(run_dir=tmp_path, config={"train": {"steps": 6}}, length_key="train.steps",
                           checkpoint_every=3, eval_steps=(2, 5), progress=False)
    fit(model, lambda m, x: (m(x).pow(2).mean(), {}), lambda epoch, start: (data[s] for s in range(start, 6)), 6,
        adamw(model, 1e-2, 0.0), Schedule(lr=1e-2, total_steps=6), settings, evaluate=evaluate)
    rows = (tmp_path / "val.csv").read_text().splitlines()
    assert rows[0] == "step,score" and [r.split(",")[0] for r in rows[1:]] == ["2", "5", "6"]
    assert len(set(seen)) == 3  # measured on the weights of three different steps


def test_evaluating_runs_in_eval_mode_and_gives_back_each_modules_mode_also_after_an_error():
    from lors.engine.loop import evaluating
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(2)))
    for mode in (True, False):
        model.train(mode)
        with evaluating(model) as inside:
            assert inside is model and not any(m.training for m in model.modules())
        assert all(m.training == mode for m in model.modules())
    model.train()
    with pytest.raises(RuntimeError, match="boom"), evaluating(model):
        raise RuntimeError("boom")
    assert all(m.training for m in model.modules())


def test_read_val_keeps_one_row_per_step_the_last_and_sorts_by_step(tmp_path):
    from lors.engine.loop import read_val
    path = tmp_path / "val.csv"
    assert read_val(path) == []
    with pytest.raises(FileNotFoundError):
        read_val(path, missing_ok=False)
    path.write_text("step,AP,AP50\n4,0.1,0.2\n2,0.05,0.1\n4,0.3,0.4\n")  # step 4 evaluated twice
    assert read_val(path) == [{"step": 2, "AP": 0.05, "AP50": 0.1}, {"step": 4, "AP": 0.3, "AP50": 0.4}]


@pytest.mark.parametrize("native", [False, True])
def test_bf16_autocast_on_a_cpu_without_bf16_units_warns_and_names_the_fix(monkeypatch, native):
    from lors.engine import loop
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loop.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
        assert loop.autocast_dtype("fp32", torch.device("cpu")) is None
    slow = [w for w in caught if "without bfloat16 instructions" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    if slow:
        assert "set amp to fp32" in str(slow[0].message)
