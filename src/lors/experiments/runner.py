"""One way to run a sweep: each run in a fresh process, a few at a time, with one progress bar.

A run in its own spawned process starts from nothing: its peak memory (`lors.engine.memory`)
and its time are its own, not coloured by the runs before it, and a crash in it cannot take
the sweep's other results with it. ``width`` runs go at once, each with an equal share of the
CPU threads (on a 2-core machine two single-thread runs beat one two-thread run).

    results = run_jobs([Job("seed 0", train_one, (cfg0,)), Job("seed 1", train_one, (cfg1,))],
                       width=2)
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm


@dataclass
class Job:
    """One run of a sweep: ``fn(*args)`` (picklable, importable at module level), what the
    sweep prints for it, and optionally its planned steps and a reader of the steps done so far
    (for the sweep's progress bar while several run at once)."""

    title: str
    fn: Callable[..., Any]
    args: tuple = ()
    steps: int = 0
    done: Callable[[], int] | None = None


def default_width() -> int:
    """Runs at a time by default: one per CPU core, at most 2."""
    return max(1, min(2, os.cpu_count() or 1))


def check_width(width: int, isolate: bool) -> None:
    """Runs in this process (not ``isolate``) go one at a time: ValueError otherwise."""
    if not isolate and width > 1:
        raise ValueError("--in-process trains one run at a time: drop it or pass --jobs 1")


def logged_step(run_dir: Path) -> int:
    """The last step in ``run_dir/log.csv`` (0 if none yet): a running child's progress
    (every trainer on the engine's loop writes it)."""
    try:
        with (run_dir / "log.csv").open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))  # more than a row, even with many logged columns
            last = f.read().decode(errors="replace").strip().splitlines()[-1]
        return int(last.split(",")[0])
    except (OSError, IndexError, ValueError):
        return 0


def _call(fn: Callable[..., Any], args: tuple, threads: int | None) -> Any:
    if threads:
        import torch
        torch.set_num_threads(threads)
    return fn(*args)


def run_in_child(fn: Callable[..., Any], args: tuple = (), threads: int | None = None) -> Any:
    """``fn(*args)`` in a fresh spawned process with ``threads`` torch CPU threads (default:
    torch's); returns its result. An exception in the child is raised here; a child that dies
    (killed, out of memory) raises RuntimeError."""
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_call, fn, args, threads).result()
        except cf.process.BrokenProcessPool as err:
            raise RuntimeError(f"the process running {getattr(fn, '__name__', fn)} died before it "
                               "finished (killed, or out of memory?)") from err


def run_jobs(jobs: Sequence[Job], width: int = 1, isolate: bool = True, threads: int | None = None,
             quiet: bool = False, on_result: Callable[[int, Job, Any], None] | None = None) -> list[Any]:
    """Run every job, ``width`` at a time, each in its own process (in this one if not
    ``isolate``: faster to start, but peak memory is then the largest so far); results in the
    order of ``jobs``. ``threads``: torch CPU threads per run (default: the CPU cores shared
    out among ``width`` runs when ``width`` > 1, else torch's default). ``on_result(i, job,
    result)`` is called as each run finishes."""
    check_width(width, isolate)
    if threads is None and width > 1:
        threads = max(1, (os.cpu_count() or 1) // width)

    def one(i: int) -> Any:
        job = jobs[i]
        if width == 1:
            print(f"== {job.title}", flush=True)
        result = run_in_child(job.fn, job.args, threads) if isolate else _call(job.fn, job.args, threads)
        if on_result is not None:
            on_result(i, job, result)
        return result

    if width == 1:
        return [one(i) for i in range(len(jobs))]
    print(f"{len(jobs)} runs, {width} at a time with {threads} CPU thread(s) each", flush=True)
    planned = sum(job.steps for job in jobs)
    with cf.ThreadPoolExecutor(width) as pool, \
            tqdm(total=planned, desc=f"{len(jobs)} runs", unit="step", disable=quiet or not planned) as bar:
        futures = [pool.submit(one, i) for i in range(len(jobs))]
        while not all(f.done() for f in futures):
            cf.wait(futures, timeout=2.0, return_when=cf.FIRST_EXCEPTION)
            if any(f.done() and f.exception() for f in futures):
                break
            bar.update(sum(min(job.done(), job.steps) for job in jobs if job.done) - bar.n)
        return [f.result() for f in futures]
