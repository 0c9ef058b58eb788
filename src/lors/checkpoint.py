"""Save and load LORS models: tensors in safetensors, the LORS layout in a JSON side-car.

``save(model, "model.safetensors")`` writes ``model.safetensors`` (each shared tensor once,
since only layer 0 registers a stack) and ``model.lors.json``. ``load(model, path)``
accepts either a model that already has the same LORS layout or the plain model the
layout was made from: it re-applies ``share_layers`` from the side-car first.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lors.core.adaptive import AdaptiveLors
from lors.core.share import LorsLinear, find_layers, share_layers
from lors.core.static import StaticLors

FORMAT_VERSION = 1


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".lors.json")


def describe(model: nn.Module) -> dict:
    """The LORS layout of ``model``: one entry per StaticLors/AdaptiveLors."""
    stacks = []
    for name, m in model.named_modules():
        if isinstance(m, StaticLors):
            entry = {"kind": "static", "path": name, "config": m.config()}
            target = getattr(m, "target", None)
            suffix = f".0.{target}.lors"
            dotted = "." + name
            if target is not None and dotted.endswith(suffix):  # made by share_layers
                entry.update(layers=dotted[: -len(suffix)][1:], target=target)
            stacks.append(entry)
        elif isinstance(m, AdaptiveLors):
            stacks.append({"kind": "adaptive", "path": name, "config": m.config()})
    return {"format": "lors", "version": FORMAT_VERSION, "stacks": stacks}


def save(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s tensors to ``path`` (safetensors) and its layout beside it.

    Both files are written to temporary names first and renamed, so an interrupted save
    never leaves a damaged checkpoint. Returns the side-car's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    layout = describe(model)
    side = sidecar_path(path)
    tmp, tmp_side = path.with_name(path.name + ".tmp"), side.with_name(side.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"lors": json.dumps(layout)})
    tmp_side.write_text(json.dumps(layout, indent=2))
    tmp.replace(path)
    tmp_side.replace(side)
    return side


def read_layout(path: str | Path) -> dict | None:
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        layout = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{side} is not valid JSON ({err}); restore it from the run that "
                         "wrote the checkpoint") from None
    if layout.get("format") != "lors":
        raise ValueError(f"{side} is not a lors layout file (no 'format': 'lors')")
    return layout


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Re-apply the ``share_layers`` calls recorded in ``layout`` to a plain model."""
    for entry in layout["stacks"]:
        if entry["kind"] != "static" or "target" not in entry:
            continue
        cfg = entry["config"]
        try:
            layers = model.get_submodule(entry["layers"]) if entry["layers"] else model
        except AttributeError:
            raise ValueError(f"the checkpoint shares layers at '{entry['layers']}', which this "
                             "model does not have: load it into the model it was saved from") from None
        found = len(find_layers(layers)[1])
        if found != cfg["num_layers"]:
            raise ValueError(f"the checkpoint shares {cfg['num_layers']} layers at "
                             f"'{entry['layers']}', this model has {found} there: build the model "
                             "with the configuration it was saved with")
        share_layers(layers, targets=entry["target"], rank=cfg["rank"], groups=cfg["groups"],
                     init=cfg["init"], shared_bias=cfg["shared_bias"])


def load(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a checkpoint written by ``save`` into ``model`` (in place; also returned).

    Raises ValueError when the file is unreadable, holds non-finite values, or its tensors
    do not fit the model (names and shapes are given).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({err}); "
                         "it may be truncated: use an earlier checkpoint") from None
    layout = read_layout(path)
    has_lors = any(isinstance(m, LorsLinear) for m in model.modules())
    if layout is not None and not has_lors:
        apply_layout(model, layout)
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"checkpoint {path}: tensor '{name}' has {bad} non-finite values "
                             "(NaN/inf); training diverged before it was saved: use an earlier "
                             "checkpoint")
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: missing "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; build the "
                         "model with the configuration it was saved with")
    for name in sorted(set(own) & set(tensors)):
        if own[name].shape != tensors[name].shape:
            raise ValueError(f"checkpoint {path}: tensor '{name}' has shape "
                             f"{tuple(tensors[name].shape)}, the model has "
                             f"{tuple(own[name].shape)}; build the model with the rank, groups "
                             "and sizes it was saved with")
    model.load_state_dict(tensors, strict=strict)
    return model
