"""Process-group helpers for ``torchrun --nproc_per_node=N -m lors …`` (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes in the environment, if any.

    Returns (rank, world_size, device). Without torchrun: (0, 1, cuda:0 or cpu).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda" alone: this process's local GPU
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def check_device(device: str) -> torch.device:
    """``device`` as a torch.device; a ValueError naming the fix for a name torch does not know
    (``--device banana``) or a GPU this process cannot see."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA GPU here (torch.cuda.is_available() is "
                             "False): use --device cpu, or install a CUDA build of torch on a GPU machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu", "mps", "meta"):
        raise ValueError(f"--device {device}: lors runs on cpu or cuda")
    return dev


def setup(device: str | None, batch_size: int) -> tuple[int, int, torch.device, int]:
    """`init_distributed` and this process's share of a global batch of ``batch_size``:
    (rank, world, device, per-process batch). ValueError if the batch does not divide."""
    rank, world, dev = init_distributed(device)
    if batch_size % world:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the {world} processes: make it "
                         "a multiple of the process count")
    return rank, world, dev, batch_size // world


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


PARALLELS = ("ddp", "fsdp")


def shard(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) on each layer of the model's stack of
    layers (``lors.core.find_layers``) and then on the root, in place; every process keeps
    1/world of each parameter. A LORS stack's shared tensors are owned by the stack, not by a
    layer, so the root's unit holds them, as it holds a tied embedding.

    ``optimizer`` was built over the plain parameters (and may hold the state a resumed run
    loaded): it is pointed at the sharded ones, its state sharded the same way.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    from lors.core.share import find_layers

    names = {id(p): n for n, p in model.named_parameters()}
    full = optimizer_state_by_name(optimizer, names)
    _, stack = find_layers(model)
    for layer in stack:
        fully_shard(layer)
    fully_shard(model)
    params = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [params[names[id(p)]] for p in group["params"]]
    optimizer.state.clear()
    if full["state"]:
        set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` was sharded with ``fully_shard`` (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """``optimizer.state_dict()`` with parameter names (``names``: id -> name) in place of indices,
    the form ``torch.distributed.checkpoint`` reads."""
    state, groups = {}, []
    for group in optimizer.param_groups:
        fqns = []
        for p in group["params"]:
            fqns.append(names[id(p)])
            if p in optimizer.state:
                state[names[id(p)]] = dict(optimizer.state[p])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": fqns})
    return {"state": state, "param_groups": groups}


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole model's and optimizer's state dicts of a sharded model, on the CPU of process 0
    (a collective: call it in every process; the others get empty dicts): the same tensors and
    the same indexed optimizer state that a single process holds, so a checkpoint written from
    them loads without FSDP."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
    model_state = get_model_state_dict(model, options=options)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    if not by_name:  # not process 0
        return {}, {}
    order = [n for g in by_name["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    optim = {"state": {index[n]: s for n, s in by_name["state"].items()},
             "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                               "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}
    return model_state, optim
