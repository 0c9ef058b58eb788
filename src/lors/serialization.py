"""Save and load LORS models: one safetensors file holding the tensors and the LORS layout.

``save(model, "m.safetensors")`` writes the state dict (each shared tensor once) and the
layout (``describe``) as the file's ``"lors"`` metadata entry, so one file describes itself
and two checkpoints in one folder never share anything. ``load(model, path)`` accepts either
a model that already has the same LORS layout or the plain model the layout was made from:
it re-creates the layout's ``share_layers``/``convert_layers`` stacks first. Layout version 1
(before each stack owned its shared modules, which were stored under the first layer that
read them, ``<layers>.0.<target>.lors.*``) loads through a key map.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lors.core.adaptive import AdaptiveLors
from lors.core.share import LorsLinear, attach, find_layers, merge
from lors.core.stack import OWNER, LayerStack, check_owner, owned, shared_stacks

FORMAT_VERSION = 2  # 2: shared modules owned by their stack (<layers>.lors.<target>.<group>)
LAYOUT_KEY = "lors"  # the safetensors metadata entry that holds the layout (JSON)
ALIASES_KEY = "lors_aliases"  # {state-dict key: key stored in its place}, for tied tensors (JSON)


def _untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to write, each stored once, and the keys that name one already stored.

    Tied weights (an embedding shared with the output layer, ALBERT-style tied blocks) are one
    tensor under several state-dict keys; safetensors refuses to write memory twice, so the
    later keys become aliases of the first. A tensor that overlaps another without being the
    same view is copied.
    """
    tensors, aliases, views, storages = {}, {}, {}, set()
    for key, value in state.items():
        value = value.detach()
        if value.numel() == 0:
            tensors[key] = value.contiguous()
            continue
        ptr = value.untyped_storage().data_ptr()
        view = (ptr, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if view in views:
            aliases[key] = views[view]
            continue
        views[view] = key
        tensors[key] = value.clone() if ptr in storages else value.contiguous()
        storages.add(ptr)
    return tensors, aliases


def write_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, then `umask_mode`."""
    save_file(tensors, str(path), metadata=metadata)
    umask_mode(path)


def umask_mode(path: str | Path) -> None:
    """Give ``path`` the mode the umask asks for new files (safetensors creates its files 0600,
    unlike every other file a run writes)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_aliases(path: str | Path) -> dict[str, str]:
    """The tied-tensor aliases that `save` recorded in ``path`` ({} for none)."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))


class SaveError(OSError, ValueError):
    """``save`` could not write the file (read-only place, full disk). A ValueError like every
    library error, and an OSError with ``errno`` set where known, so code that handles I/O
    errors (the training loop's checkpointing) catches it as well."""

    @classmethod
    def wrap(cls, err: Exception, message: str) -> "SaveError":
        new = cls(message)
        new.errno = getattr(err, "errno", None)
        if new.errno is None:  # safetensors reports I/O errors as text: "... (os error 28)"
            found = re.search(r"os error (\d+)", str(err))
            new.errno = int(found.group(1)) if found else None
        new.strerror = os.strerror(new.errno) if new.errno else None
        return new

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] strerror"
        return str(self.args[0])


def _placements(model: nn.Module) -> dict[int, list[tuple[str, int]]]:
    """id(stack module) -> (path, index) of every LorsLinear that reads it."""
    found: dict[int, list[tuple[str, int]]] = {}
    for name, m in model.named_modules():
        if isinstance(m, LorsLinear):
            found.setdefault(id(m.lors), []).append((name, m.index))
    return found


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _in_place(module: LayerStack, layers: str, placed: list[tuple[str, int]]) -> bool:
    """True when layer j of ``module`` is read at ``<layers>.<members[j]>.<target>``, for every j."""
    want = {(_join(layers, str(i), module.target), j) for j, i in enumerate(module.members)}
    return len(module.members) == module.num_layers and set(placed) == want


def describe(model: nn.Module) -> dict:
    """The LORS layout of ``model``: one entry per StaticLors/SharedBasis/AdaptiveLors, with its
    ``path`` in the state dict and its ``config``. A stack module owned by a shared stack whose
    layers are still where they were wired in also records ``layers`` (the stack's path),
    ``target`` and ``members`` (the layer index of each of its layers): what ``apply_layout``
    needs to re-create it on a plain model."""
    model = unwrap(model)
    stacks, placements, seen = [], _placements(model), set()
    for path, stack in shared_stacks(model):
        for target, group in owned(stack).items():
            for gi, m in enumerate(group):
                entry = {"kind": m.kind,
                         "path": _join(path, OWNER, target, str(gi)), "config": m.config()}
                if _in_place(m, path, placements.get(id(m), [])):
                    entry.update(layers=path, target=target, members=list(m.members))
                stacks.append(entry)
                seen.add(id(m))
    for name, m in model.named_modules():  # stack modules used directly (the detector's)
        if id(m) in seen:
            continue
        if isinstance(m, LayerStack):
            stacks.append({"kind": m.kind, "path": name,
                           "config": m.config()})
        elif isinstance(m, AdaptiveLors):
            stacks.append({"kind": "adaptive", "path": name, "config": m.config()})
    return {"format": "lors", "version": FORMAT_VERSION, "stacks": stacks}


def unwrap(model: nn.Module) -> nn.Module:
    """The module that ``torch.compile`` wrapped (its state dict keys carry ``_orig_mod.``), or
    ``model`` itself."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def save(model: nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s tensors and its layout to the one safetensors file ``path``.

    ``state`` replaces ``model.state_dict()`` where the tensors were gathered elsewhere (the
    full state dict of an FSDP-sharded model).

    The file is written under a temporary name and renamed, so an interrupted save never
    leaves a damaged checkpoint. Returns ``path``. Raises ValueError when the model holds no
    tensors or ``path`` is a directory, and ``SaveError`` (a ValueError and an OSError) when
    the file cannot be written (a read-only place, a full disk).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot save to {path}: it is a directory; pass a file name such as "
                         f"{path / 'model.safetensors'}")
    model = unwrap(model)  # a compiled model saves what the plain one loads
    state = model.state_dict() if state is None else state
    if not state:
        raise ValueError(f"{type(model).__name__} holds no parameters or buffers, so there is "
                         f"nothing to save to {path}: pass the module that holds the weights")
    odd = [k for k, v in state.items() if not torch.is_tensor(v)]
    if odd:
        raise ValueError(f"state dict entry '{odd[0]}' is a {type(state[odd[0]]).__name__}, not "
                         "a tensor; safetensors stores tensors only: make get_extra_state return "
                         "a tensor")
    tensors, aliases = _untie(state)
    metadata = {LAYOUT_KEY: json.dumps(describe(model))}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tensors(tensors, tmp, metadata)
        tmp.replace(path)
    except (OSError, SafetensorError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise SaveError.wrap(err, f"cannot write checkpoint {path} ({err}): pass a path in a "
                             "writable directory on a disk with free space") from None
    return path


def _check_layout(layout, source: str) -> dict:
    bad = "not a JSON object"
    if isinstance(layout, dict):
        stacks = layout.get("stacks")
        if layout.get("format") != "lors":
            bad = "no 'format': 'lors'"
        elif not isinstance(stacks, list) or not all(
                isinstance(e, dict) and {"kind", "config"} <= set(e) for e in stacks):
            bad = "no list of 'stacks' with a 'kind' and a 'config' each"
        else:
            return layout
    raise ValueError(f"{source} is not a lors layout ({bad}): load the file the checkpoint was "
                     "written with, or save the model again with lors.save")


def read_layout(path: str | Path) -> dict | None:
    """The layout of checkpoint ``path``: its ``"lors"`` metadata entry; None without one."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({err})") from None
    if LAYOUT_KEY not in meta:
        return None
    text, source = meta[LAYOUT_KEY], f"the '{LAYOUT_KEY}' metadata of {path}"
    try:
        layout = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err}); restore the checkpoint from the "
                         "run that wrote it") from None
    return _check_layout(layout, source)


def _v1_keys(tensors: dict, layout: dict, model: nn.Module) -> dict:
    """Rename the tensors of a version-1 checkpoint (each stack module stored under the first
    layer that read it, ``<layers>.<i>.<target>.lors.*``) to where ``model`` owns them
    (``<layers>.lors.<target>.<group>.*``), matched by (layers, target, members)."""
    now = {(e["layers"], e["target"], tuple(e["members"])): e["path"]
           for e in describe(model)["stacks"] if "target" in e}
    renames = {}
    for e in layout["stacks"]:
        if "target" not in e:
            continue
        members = tuple(e.get("members", range(e["config"]["num_layers"])))
        new = now.get((e["layers"], e["target"], members))
        if new is not None:
            renames[e["path"] + "."] = new + "."
    out = {}
    for key, value in tensors.items():
        old = next((p for p in renames if key.startswith(p)), None)
        out[key if old is None else renames[old] + key[len(old):]] = value
    return out


def _plan_layout(model: nn.Module, layout: dict) -> list[tuple[nn.Module, dict, list[int]]]:
    """(stack, entry, members) for every entry that ``apply_layout`` re-creates, every entry
    checked against ``model`` before anything changes."""
    plan = []
    for entry in layout["stacks"]:
        if entry["kind"] not in LayerStack.kinds() or "target" not in entry:
            continue
        cfg, target = entry["config"], entry["target"]
        try:
            holder = model.get_submodule(entry["layers"]) if entry["layers"] else model
        except AttributeError:
            raise ValueError(f"the checkpoint shares layers at '{entry['layers']}', which this "
                             "model does not have: load it into the model it was saved from") from None
        stack = find_layers(holder)[1]
        members = list(entry.get("members", range(cfg["num_layers"])))  # version 1: share_layers
        depth = cfg["num_layers"] if "members" not in entry else max(members) + 1
        if len(stack) < depth or ("members" not in entry and len(stack) != depth):
            raise ValueError(f"the checkpoint shares {depth} layers at "
                             f"'{entry['layers']}', this model has {len(stack)} there: build the model "
                             "with the configuration it was saved with")
        for i in members:
            ref = None
            if i < len(stack):
                try:
                    ref = stack[i].get_submodule(target)
                except AttributeError:
                    pass
            if not isinstance(ref, nn.Linear):
                raise ValueError(f"the checkpoint shares '{target}' of layers {members} at "
                                 f"'{entry['layers']}', which this model does not have as an "
                                 f"nn.Linear (layer {i}): load it into the model it was saved from")
            if (ref.in_features, ref.out_features) != (cfg["in_features"], cfg["out_features"]):
                raise ValueError(f"the checkpoint shares '{target}' as ({cfg['out_features']}, "
                                 f"{cfg['in_features']}) weights; layer {i} of this model has "
                                 f"({ref.out_features}, {ref.in_features}): build the model with the "
                                 "configuration it was saved with")
        check_owner(stack)
        plan.append((stack, entry, members))
    return plan


def apply_layout(model: nn.Module, layout: dict):
    """Re-apply the ``share_layers`` and ``convert_layers`` results recorded in ``layout`` to a
    plain model (the values come from the checkpoint afterwards). Every entry is checked
    first: a layout that does not fit leaves the model unchanged. Returns a function that
    undoes it (puts the original Linears back)."""
    replaced = []  # (layer, target, original Linear)
    for stack, entry, members in _plan_layout(model, layout):
        ref = stack[members[0]].get_submodule(entry["target"])
        kw = dict(device=ref.weight.device, dtype=ref.weight.dtype)
        cls = LayerStack.of_kind(entry["kind"])
        replaced += [(stack[i], entry["target"], stack[i].get_submodule(entry["target"])) for i in members]
        attach(stack, entry["target"], cls(**entry["config"], **kw), members)

    def undo() -> None:
        for layer, target, linear in replaced:
            parent, _, leaf = target.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, leaf, linear)
        merge(model)  # releases the stack modules that no layer reads any more

    return undo


def load(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a checkpoint written by ``save`` into ``model`` (in place; also returned).

    Raises ValueError when the file is missing or unreadable, holds non-finite values, has
    no LORS layout (it was not written by ``save``), or its tensors do not fit the model
    (names and shapes are given).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory: pass the .safetensors file in it")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({err}); "
                         "it may be truncated: use an earlier checkpoint") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"checkpoint {path}: tensor '{name}' has {bad} non-finite values "
                             "(NaN/inf); training diverged before it was saved: use an earlier "
                             "checkpoint")
    for alias, stored in read_aliases(path).items():  # tied tensors were written once
        if stored in tensors:
            tensors[alias] = tensors[stored]
    layout = read_layout(path)
    if layout is None:
        raise ValueError(f"checkpoint {path} has no LORS layout (no '{LAYOUT_KEY}' metadata), so "
                         "lors.save did not write it: "
                         "load a plain safetensors file with model.load_state_dict("
                         "safetensors.torch.load_file(path)), and write checkpoints with lors.save")
    if layout.get("version", 1) > FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has layout version {layout['version']}, newer than this "
                         f"lors reads ({FORMAT_VERSION}): upgrade lors")
    model = unwrap(model)
    has_lors = any(isinstance(m, LorsLinear) for m in model.modules())
    undo = None if has_lors else apply_layout(model, layout)
    try:
        _load_tensors(model, path, tensors, layout, has_lors, strict)
    except BaseException:
        if undo is not None:  # a refused file leaves the plain model as it was
            undo()
        raise
    return model


def _load_tensors(model: nn.Module, path: Path, tensors: dict, layout: dict, has_lors: bool,
                  strict: bool) -> None:
    if layout.get("version", 1) == 1:
        tensors = _v1_keys(tensors, layout, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if strict and (missing or unexpected):
        hint = "build the model with the configuration it was saved with"
        if not has_lors and any(k.startswith(OWNER + ".") or f".{OWNER}." in k for k in unexpected):
            hint = ("its LORS layers were removed, sliced or copied after share_layers, so the "
                    "layout cannot re-create them: load it into a model changed the same way")
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: missing "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; {hint}")
    for name in sorted(set(own) & set(tensors)):
        if own[name].shape != tensors[name].shape:
            raise ValueError(f"checkpoint {path}: tensor '{name}' has shape "
                             f"{tuple(tensors[name].shape)}, the model has "
                             f"{tuple(own[name].shape)}; build the model with the rank, groups "
                             "and sizes it was saved with")
    model.load_state_dict(tensors, strict=strict)

