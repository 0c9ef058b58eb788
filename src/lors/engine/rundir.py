"""Run-directory safety: one writer at a time, resume only what the settings describe, and a
fresh start that loses nothing until the new run has something to show.

- ``RunLock``: an exclusive ``fcntl`` lock on ``<run_dir>/.lock`` (released by the OS when
  the process ends, so a crash never leaves a stale lock); a second trainer is refused with
  the holder's pid, host and start time.
- ``config_differences``: the dotted keys where a run's stored config and the requested one
  differ, so that resuming a run with other settings is refused with the keys named.
- ``set_aside`` / ``drop_set_aside``: a fresh start moves the earlier run's files (checkpoints,
  ``last.json``, logs, TensorBoard events) into ``<run_dir>/.previous_run`` and deletes them
  only once the new run has saved its first checkpoint; files the run did not write stay put.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable, Mapping

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are then not protected from each other
    fcntl = None

PREVIOUS = ".previous_run"
LOCK = ".lock"
# what a training run writes into its directory; anything else there belongs to the user
RUN_FILES = ("last.json", "last.json.tmp", "log.csv", "val.csv", "config.yaml", "result.json", "eval.txt", "tb")
RUN_GLOBS = ("ckpt_*", ".ckpt_*.tmp")


class RunDirBusyError(ValueError):
    """Another process is training in this run directory."""


class RunLock:
    """Hold ``<run_dir>/.lock`` exclusively while training (a context manager).

    Raises ``RunDirBusyError`` naming the holder if another process has it, and ``ValueError``
    if the directory cannot be written.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.file = None

    def __enter__(self) -> "RunLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.file = (self.run_dir / LOCK).open("a+")
        except OSError as err:
            raise ValueError(f"run directory {self.run_dir} is not writable ({err.strerror}): "
                             "choose another --run-dir or fix its permissions") from None
        if fcntl is None:
            return self
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise RunDirBusyError(f"run directory {self.run_dir} is in use by {holder}: wait for that "
                                  "run to end, or train into another --run-dir") from None
        self.file.seek(0)
        self.file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} (started {started})\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()
            self.file.close()  # closing releases the lock
            self.file = None


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(stored: Mapping[str, Any], requested: Mapping[str, Any],
                       ignore: Iterable[str] = (), defaults: Mapping[str, Any] | None = None
                       ) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, requested value)`` for each dotted key that differs, except keys
    equal to or under an entry of ``ignore``. A key that ``stored`` lacks takes its value in
    ``defaults`` (the config type's defaults): a run saved before the key existed was made with
    the behaviour its default keeps, so only a non-default request counts as a change."""
    ignore = tuple(ignore)
    a, b = {**_flatten(defaults or {}), **_flatten(stored)}, _flatten(requested)
    skip = lambda k: any(k == i or k.startswith(i + ".") for i in ignore)  # noqa: E731
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if not skip(k) and a.get(k) != b.get(k)]


def describe(differences: list[tuple[str, Any, Any]], names: Mapping[str, str] | None = None) -> str:
    """``"train.lr 0.0004 -> 0.001, train.seed 0 -> 5"``; ``names`` shows a key as the flag a
    user sets it with (``{"uptrain.lr": "--uptrain-lr"}``)."""
    names = names or {}
    return ", ".join(f"{names.get(k, k)} {json.dumps(old)} -> {json.dumps(new)}" for k, old, new in differences)


def run_files(run_dir: Path) -> list[Path]:
    """The files and folders a training run wrote into ``run_dir``."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    for pattern in RUN_GLOBS:
        found += sorted(run_dir.glob(pattern))
    return found


def set_aside(run_dir: str | Path) -> Path | None:
    """Move an earlier run's files into ``run_dir/.previous_run`` (returned; None if there
    were none). An existing ``.previous_run`` is kept if ``run_dir`` holds no checkpoint (a
    fresh start that crashed before saving one: what it left is dropped instead)."""
    run_dir = Path(run_dir)
    files = run_files(run_dir)
    if not files:
        return None
    previous = run_dir / PREVIOUS
    if previous.exists():
        if not any(run_dir.glob("ckpt_*")):
            for f in files:
                shutil.rmtree(f) if f.is_dir() else f.unlink()
            return previous
        shutil.rmtree(previous)
    tmp = run_dir / (PREVIOUS + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in files:
        f.rename(tmp / f.name)
    tmp.rename(previous)
    return previous


def drop_set_aside(run_dir: str | Path) -> None:
    """Delete ``run_dir/.previous_run``: the new run has saved its first checkpoint."""
    shutil.rmtree(Path(run_dir) / PREVIOUS, ignore_errors=True)
