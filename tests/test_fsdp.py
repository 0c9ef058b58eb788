"""FSDP2 (`fully_shard` on each layer, then the root) on LORS-shared stacks, 2 processes, gloo:
one step equals a single-process step on the combined batch; checkpoints written under FSDP are
the single-process ones; `lors lm train --parallel fsdp` resumes exactly."""
import csv
import os

import pytest
import torch
import torch.multiprocessing as mp

from lors import share_layers
from lors.engine import distributed
from lors.engine.loop import adamw

from test_gpt import _free_port, config


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64)
    model = transformers.LlamaForCausalLM(cfg)
    share_layers(model.model.layers, rank=4)
    with torch.no_grad():  # non-zero private factors, so every parameter has a gradient
        for name, p in model.named_parameters():
            if ".lors." in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    return model


def _build(kind, tmp_path):
    if kind == "llama":
        return _llama(), lambda m, x: m(input_ids=x, labels=x).loss
    from lors.experiments.lm.train import lm_loss
    from lors.models.gpt import build_gpt
    torch.manual_seed(0)
    model = build_gpt(config("gpt_small_lors", tmp_path))
    return model, lambda m, x: lm_loss(m, x[:, :-1], x[:, 1:])


def _batch():
    return torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))


def _step_worker(rank, world, port, kind, tmp_path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model, loss_fn = _build(kind, tmp_path)
    opt = adamw(model, 1e-3, 0.1)
    distributed.shard(model, opt)
    assert distributed.is_sharded(model)
    loss = loss_fn(model, _batch()[rank * 2:rank * 2 + 2])
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    opt.step()
    state, optim = distributed.full_state(model, opt)
    if rank == 0:
        torch.save({"grads": grads, "state": state, "optim": optim}, out)
    torch.distributed.barrier()  # neither process tears the group down while the other still uses it
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_one_fsdp_step_equals_one_process_on_the_combined_batch(kind, tmp_path):
    out = tmp_path / "fsdp.pt"
    mp.spawn(_step_worker, args=(2, _free_port(), kind, tmp_path, out), nprocs=2, join=True)
    got = torch.load(out)
    model, loss_fn = _build(kind, tmp_path)
    opt = adamw(model, 1e-3, 0.1)
    loss_fn(model, _batch()).backward()
    named = dict(model.named_parameters())
    assert set(got["grads"]) == set(named) and any(".lors." in n for n in named)
    for name, p in named.items():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    opt.step()
    state = model.state_dict()
    assert got["state"].keys() == state.keys()
    for name, value in state.items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    mine = opt.state_dict()
    assert got["optim"]["param_groups"] == mine["param_groups"]  # the single-process indexing
    for idx, s in mine["state"].items():
        torch.testing.assert_close(got["optim"]["state"][idx]["exp_avg"], s["exp_avg"], rtol=1e-4, atol=1e-7)


def _train_worker(rank, world, port, cfg, run_dir, stop_after):
    from lors.experiments.lm.train import train
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    train(cfg, run_dir=run_dir, stop_after=stop_after, progress=False, parallel="fsdp")
    torch.distributed.destroy_process_group()


def _losses(run_dir):
    with open(run_dir / "log.csv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def test_lm_train_under_fsdp_resumes_exactly_and_its_checkpoint_loads_in_one_process(tmp_path):
    from lors.experiments.lm.train import evaluate, load_lm, load_tokens
    cfg = config("gpt_small_lors", tmp_path, "train.steps=4", "train.eval_batches=1")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    mp.spawn(_train_worker, args=(2, _free_port(), cfg, whole, None), nprocs=2, join=True)
    mp.spawn(_train_worker, args=(2, _free_port(), cfg, cut, 2), nprocs=2, join=True)
    assert len(_losses(cut)) == 2
    mp.spawn(_train_worker, args=(2, _free_port(), cfg, cut, None), nprocs=2, join=True)
    assert _losses(cut) == _losses(whole) and len(_losses(whole)) == 4
    with open(whole / "val.csv") as f:
        sharded_bpb = float(next(csv.DictReader(f))["val_bpb"])
    model, loaded_cfg, _ = load_lm(whole)  # one process, no FSDP
    single = evaluate(model, load_tokens(loaded_cfg), loaded_cfg, torch.device("cpu"))["val_bpb"]
    assert single == pytest.approx(sharded_bpb, rel=1e-4)
