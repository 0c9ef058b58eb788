"""Which command a run directory belongs to, told from the config its checkpoints store, so
that `lors lm eval` handed a ViT or detector run says where it belongs instead of failing on
the first config key it does not know."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from lors.config import load_config
from lors.engine.checkpoint import find_checkpoint, read_state

COMMANDS = {"lm": "lors lm train", "vit": "lors vit train", "detect": "lors detect train",
            "uptrain": "lors convert --uptrain-steps"}
READERS = {"lm": "lors lm eval / lors lm sample", "vit": "lors vit train --extend",
           "detect": "lors detect eval / predict / merge", "uptrain": "lors convert"}


def family(config: Mapping) -> str | None:
    """"lm", "vit", "detect" or "uptrain" for a run's stored config; None if it is none of them."""
    model = config.get("model") if isinstance(config.get("model"), Mapping) else {}
    if "decoder" in config and "backbone" in config:
        return "detect"
    if "n_layer" in model:
        return "lm"
    if "patch_size" in model and "depth" in model:
        return "vit"
    if "uptrain" in config or "teacher" in config:
        return "uptrain"
    return None


def check_family(config: Mapping, expected: str, ckpt: str | Path) -> None:
    """A ValueError naming the command that wrote the run in ``ckpt`` when it is not ``expected``."""
    found = family(config)
    if found is not None and found != expected:
        raise ValueError(f"{Path(ckpt).parent} holds a run of `{COMMANDS[found]}`, not of `{COMMANDS[expected]}`: "
                         f"read it with {READERS[found]}")


def run_config(path: str | Path, expected: str, config_cls: type, overrides: Sequence[str] = ()):
    """(checkpoint folder, config, state.json) of the run in ``path`` (a run directory or a
    ``ckpt_*`` folder) that ``COMMANDS[expected]`` wrote: the config stored with the checkpoint,
    plus ``overrides``. A ValueError names a folder without a checkpoint and a run of another
    command."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{path} holds no checkpoint (no state.json or last.json): pass a run directory "
                         f"written by `{COMMANDS[expected]}` or one of its ckpt_* folders")
    state = read_state(ckpt)
    check_family(state.get("config", {}), expected, ckpt)
    return ckpt, load_config(config_cls, state["config"], overrides), state
