"""Detector training engine: exact resume, NaN loss, DDP gradients, overfitting 4 images."""
import csv
import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lors.experiments.detection import train as train_module
from lors.experiments.detection.data import build_datasets
from lors.engine.checkpoint import find_checkpoint, load_checkpoint
from lors.engine.schedule import Schedule
from lors.experiments.detection.train import EpochSampler, NonFiniteLossError, train
from lors.models.adamixer import build_criterion, build_detector, load_detector_config
from shapes_data import write_shapes


def tiny_config(tmp_path, name="tiny_lors", *extra, num_images=4, size=64):
    images, ann = write_shapes(tmp_path / "data", num_images=num_images, size=size)
    return load_detector_config(name, [
        f"data.train_images={images}", f"data.train_annotations={ann}",
        f"data.val_images={images}", f"data.val_annotations={ann}",
        f"data.min_size={size}", f"data.max_size={size}", "train.batch_size=2", "train.epochs=3",
        "train.lr_steps=[2]", "train.warmup_iters=2", "train.checkpoint_every=2", *extra])


def losses(run_dir):
    with open(run_dir / "log.csv") as f:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(f)]


def test_sampler_shards_one_permutation_and_resumes_mid_epoch():
    full = list(EpochSampler(10, 2, seed=3))
    a, b = EpochSampler(10, 1, 3, rank=0, world=2), EpochSampler(10, 1, 3, rank=1, world=2)
    assert sorted(list(a) + list(b)) == sorted(full[:10])
    later = EpochSampler(10, 2, seed=3)
    later.set_epoch(0, start_step=2)
    assert list(later) == full[4:]


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    cfg = tiny_config(tmp_path, "tiny_lors", "train.lr=1e-3")  # flip and dropout-free by default
    whole = train(cfg, run_dir=tmp_path / "whole", progress=False, evaluate_at_end=False)
    assert whole["steps"] == 6
    # run to step 3, then lose everything after the checkpoint of step 2, as a crash would
    run = tmp_path / "cut"
    train(cfg, run_dir=run, stop_after=3, progress=False, evaluate_at_end=False)
    shutil.rmtree(run / "ckpt_00000003")
    (run / "last.json").write_text(json.dumps({"checkpoint": "ckpt_00000002", "step": 2}))
    assert [s for s, _ in losses(run)] == [1, 2, 3]
    train(cfg, run_dir=run, progress=False, evaluate_at_end=False)
    assert losses(run) == losses(tmp_path / "whole")


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "tiny")
    real = train_module.build_criterion

    def poisoned(cfg):
        criterion = real(cfg)
        calls = {"n": 0}
        total = criterion.total

        def nan_at_third(losses):
            calls["n"] += 1
            value = total(losses)
            return value * float("nan") if calls["n"] == 3 else value
        criterion.total = nan_at_third
        return criterion
    monkeypatch.setattr(train_module, "build_criterion", poisoned)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2 .*checkpoint .* is intact"):
        train(cfg, run_dir=run, progress=False, evaluate_at_end=False)
    ckpt = find_checkpoint(run)
    assert ckpt.name == "ckpt_00000002"
    model = build_detector(cfg)
    assert load_checkpoint(ckpt, model)["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_detector(cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, sizes, targets = batch
    half = slice(rank * 2, rank * 2 + 2)
    criterion = build_criterion(cfg)
    loss = criterion.total(criterion(ddp(images[half], sizes[half]), targets[half]))
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    torch.distributed.destroy_process_group()


def test_two_process_ddp_step_equals_one_process_on_the_combined_batch(tmp_path):
    cfg = tiny_config(tmp_path, "tiny_lors")
    train_set, _ = build_datasets(cfg, val=False)
    from lors.data.coco import collate_fn
    batch = collate_fn([train_set[i] for i in range(4)])  # 4 images of one size
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, batch, out), nprocs=2, join=True)
    torch.manual_seed(0)
    model = build_detector(cfg)
    criterion = build_criterion(cfg)
    criterion.total(criterion(model(batch[0], batch[1]), batch[2])).backward()
    ddp_grads = torch.load(out)
    assert len(ddp_grads) == sum(p.grad is not None for p in model.parameters()) > 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_tiny_config_overfits_four_images(tmp_path):
    # the random-init backbone is frozen to keep the test short: the decoder does the learning.
    # 160 steps: at 120, AP50 cleared 0.9 on one CPU and was 0.83 on another (rounding differs by
    # instruction set); at 160 it is 1.0 for seeds 0, 1 and 2 on the latter
    cfg = tiny_config(tmp_path, "tiny", "train.lr=1e-3", "train.batch_size=4", "train.epochs=160",
                      "train.lr_steps=[160]", "train.warmup_iters=10", "train.checkpoint_every=1000",
                      "backbone.frozen_stages=4", "data.flip_prob=0.0", size=96)
    summary = train(cfg, run_dir=tmp_path / "run", progress=False)
    assert summary["steps"] == 160
    assert summary["metrics"]["AP50"] >= 0.9


def test_cli_eval_and_predict_read_a_run_directory(tmp_path, capsys):
    from PIL import Image

    from lors.cli import main
    cfg = tiny_config(tmp_path, "tiny")
    run = tmp_path / "run"
    train(cfg, run_dir=run, stop_after=2, progress=False, evaluate_at_end=False)
    assert main(["detect", "eval", "--checkpoint", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    image = next((tmp_path / "data" / "images").glob("*.png"))
    out = tmp_path / "pred.png"
    assert main(["detect", "predict", "--checkpoint", str(run), "--image", str(image),
                 "--out", str(out), "--score-threshold", "0"]) == 0
    assert Image.open(out).size == Image.open(image).size
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["detect", "predict", "--checkpoint", str(run), "--image", str(broken),
                 "--out", str(out)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_log_csv_is_flushed_every_log_every_steps_not_only_at_checkpoints(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "tiny", "train.checkpoint_every=100", "train.log_every=2")
    run, seen = tmp_path / "run", {}
    real = Schedule.scale_groups

    def watch(self, optimizer, step):  # called at the start of each step: what has a reader seen so far?
        if (run / "log.csv").exists():
            seen[step] = [s for s, _ in losses(run)]
        return real(self, optimizer, step)

    monkeypatch.setattr(Schedule, "scale_groups", watch)
    train(cfg, run_dir=run, progress=False, evaluate_at_end=False)
    assert seen[2] == [1, 2] and seen[4] == [1, 2, 3, 4]  # before the first checkpoint (step 6)


def test_lors_tensors_get_their_own_rates_and_decay_when_asked(tmp_path):
    from lors.experiments.detection.train import build_optimizer
    from lors.models.adamixer.mixing import lors_parameter_roles
    plain = tiny_config(tmp_path, "tiny_lors")
    model = build_detector(plain)
    assert len(build_optimizer(plain, model).param_groups) == 1  # the default: one group, as before
    cfg = tiny_config(tmp_path, "tiny_lors", "train.shared_lr_scale=0.5", "train.private_lr_scale=4.0",
                      "train.private_weight_decay=0.0")
    opt = build_optimizer(cfg, model)
    roles = lors_parameter_roles(model.decoder.mixing)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(by_id) == sorted(id(p) for p in trainable)  # every trainable tensor exactly once
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    lr, wd = cfg.train.lr, cfg.train.weight_decay
    assert all(by_id[id(p)]["lr"] == lr * 4.0 and by_id[id(p)]["weight_decay"] == 0.0 for p in roles["private"])
    assert all(by_id[id(p)]["lr"] == lr * 0.5 and by_id[id(p)]["weight_decay"] == wd for p in roles["shared"])
    backbone = next(model.backbone.parameters())
    assert by_id[id(backbone)]["lr"] == lr and by_id[id(backbone)]["weight_decay"] == wd
    with pytest.raises(ValueError, match="this config has none"):
        build_optimizer(tiny_config(tmp_path, "tiny", "train.private_lr_scale=2.0"),
                        build_detector(tiny_config(tmp_path, "tiny")))
    with pytest.raises(ValueError, match="train.private_lr_scale"):
        tiny_config(tmp_path, "tiny_lors", "train.private_lr_scale=0")
