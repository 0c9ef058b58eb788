"""Training checkpoints: model and optimizer tensors in safetensors, the rest in JSON.

A run directory holds ``ckpt_<step>/`` folders (``model.safetensors``, ``optimizer.safetensors``,
``state.json``) and ``last.json`` naming the newest. Each folder is written under a temporary
name and renamed, and ``last.json`` is replaced atomically after that, so a crash at any
moment leaves the previous checkpoint whole and ``last.json`` valid; a failed write removes its
partial folder. Without a usable ``last.json`` the newest complete folder is found by name.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lors.serialization import SaveError, umask_mode
from lors.serialization import load as load_model
from lors.serialization import save as save_model

KEEP = 2  # checkpoints kept in a run directory


def _rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(tensors: dict, state: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))


class CheckpointWriteError(SaveError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact.
    Like ``SaveError``, a ValueError (one line from the CLI) and an OSError with ``errno``."""


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, full: tuple[dict, dict] | None = None) -> Path:
    """Write ``ckpt_<step>`` into ``run_dir`` and point ``last.json`` at it.

    ``full``: the (model, optimizer) state dicts gathered from a sharded model
    (``distributed.full_state``), written instead of the model's and optimizer's own, so the
    checkpoint is the one a single process would write.

    If writing fails (a full disk, an interruption), the partial folder is removed and the
    previous checkpoint stays the newest; an ``OSError`` becomes ``CheckpointWriteError``.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt_{step:08d}"
    tmp = run_dir / f".ckpt_{step:08d}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, tmp / "model.safetensors", None if full is None else full[0])
        opt = optimizer.state_dict() if full is None else full[1]
        tensors, groups = {}, opt["param_groups"]
        for idx, pstate in opt["state"].items():
            for key, value in pstate.items():
                tensors[f"state.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        rng_tensors, rng = _rng_state()
        save_file({**tensors, **rng_tensors}, str(tmp / "optimizer.safetensors"))
        umask_mode(tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "param_groups": groups,
                                                    "rng": rng}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = run_dir / "last.json.tmp"
        pointer.write_text(json.dumps({"checkpoint": final.name, "step": step}))
        os.replace(pointer, run_dir / "last.json")
    except BaseException as err:  # a full disk, Ctrl-C: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        (run_dir / "last.json.tmp").unlink(missing_ok=True)
        # safetensors reports a failed write (a full disk) as SafetensorError, not OSError
        if isinstance(err, (OSError, SafetensorError)) and not isinstance(err, CheckpointWriteError):
            previous = find_checkpoint(run_dir)
            reason = getattr(err, "strerror", None) or err
            raise CheckpointWriteError.wrap(
                err, f"could not write the checkpoint of step {step} to {run_dir} ({reason}); "
                + (f"{previous.name} is intact: free space or fix permissions, then rerun the same "
                   "command to resume" if previous else "no earlier checkpoint exists")) from None
        raise
    for old in checkpoints(run_dir)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(ckpt: Path) -> bool:
    """Whether a checkpoint folder has all its files (it may still be unreadable inside)."""
    return all((ckpt / name).is_file() for name in ("state.json", "model.safetensors", "optimizer.safetensors"))


def drop_checkpoints(run_dir: str | Path) -> None:
    """Delete every ``ckpt_*`` folder of ``run_dir`` and its ``last.json``: for a finished run
    whose result is written elsewhere (its log and config stay)."""
    for ckpt in Path(run_dir).glob("ckpt_*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    (Path(run_dir) / "last.json").unlink(missing_ok=True)


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete ``ckpt_*`` folders of ``run_dir``, newest first."""
    return sorted((p for p in Path(run_dir).glob("ckpt_*") if p.is_dir() and is_complete(p)), reverse=True)


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint folder, or the newest one of a run directory (None if it has none).

    ``last.json`` names the newest; if it is missing or names a folder that is gone or
    incomplete, the newest complete ``ckpt_*`` folder is used instead.
    """
    path = Path(path)
    if (path / "state.json").exists():
        return path
    pointer = path / "last.json"
    if pointer.exists():
        try:
            named = path / json.loads(pointer.read_text())["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError):
            named = None
        if named is not None and is_complete(named):
            return named
    found = checkpoints(path)
    return found[0] if found else None


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {ckpt} has no readable state.json ({err}): use another "
                         "checkpoint of the run") from None


def load_checkpoint(ckpt: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = False) -> dict:
    """Load model (and optimizer, RNG) from a checkpoint folder; returns its state.json."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    load_model(model, ckpt / "model.safetensors")
    if optimizer is None and not restore_rng:
        return state
    try:
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {ckpt}: optimizer.safetensors is unreadable ({err}); "
                         "use another checkpoint of the run") from None
    if optimizer is not None:
        opt_state: dict = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, idx, name = key.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    if restore_rng:
        _set_rng_state(tensors, state["rng"])
    return state
