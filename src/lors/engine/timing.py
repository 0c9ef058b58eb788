"""Side-by-side timing: the one way the benchmarks time things.

    times = interleaved({"lors": step_a, "plain": step_b}, repeats=15)
    median(times["lors"]), median_ratio(times["lors"], times["plain"])

Every callable runs once per round, the order rotating from round to round, after
``warmup`` untimed rounds; a ratio is the median of the ratios of runs of the same round,
which drift and load on a shared machine affect least. On a GPU, pass ``sync`` (for example
``torch.cuda.synchronize``) so each time covers the work the call queued.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping, Sequence

from tqdm import tqdm


def interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 3,
                sync: Callable[[], object] | None = None, progress: str | None = None) -> dict[str, list[float]]:
    """Seconds of each of ``fns`` in each of ``repeats`` rounds (keys as ``fns``).
    ``progress``: show a progress bar with this title."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    sync = sync or (lambda: None)
    rounds = tqdm(range(warmup + repeats), desc=progress, unit="round", disable=progress is None, leave=False)
    for k in rounds:
        order = names[k % len(names):] + names[:k % len(names)]  # who goes first rotates
        for name in order:
            sync()
            tic = time.perf_counter()
            fns[name]()
            sync()
            if k >= warmup:
                times[name].append(time.perf_counter() - tic)
    return times


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median of a[k] / b[k] over the rounds k."""
    return statistics.median(x / y for x, y in zip(a, b))


def ratio_quartiles(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles of a[k] / b[k] over the rounds k: the spread behind
    ``median_ratio`` (both the one ratio when there is one round)."""
    ratios = [x / y for x, y in zip(a, b)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3
