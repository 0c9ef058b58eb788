"""Peak memory of a block of code: the one measure that every benchmark and table reports.

    with PeakMemory(device) as mem:
        train(...)
    mem.peak_mib     # the highest memory in use while the block ran
    mem.growth_mib   # that peak minus what was in use when the block started

CUDA: bytes allocated by torch on the device (``max_memory_allocated``, reset on entry).
CPU: this process's resident set. On Linux the kernel's own peak (``VmHWM``) is reset on entry
(``/proc/self/clear_refs``) and read on exit, so nothing is missed between samples; where that
is not possible the resident set is sampled every 5 ms by a background thread. A child process
does not count: run a measured job in its own process (`lors.experiments.runner`) to measure
it alone. ``PeakMemory(release_freed=True)`` first hands the heap memory that earlier work
freed back to the system (glibc's ``malloc_trim``, Linux), so that the resident set at entry
is live memory and not what an earlier step left behind.
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
from pathlib import Path

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    """The kernel's peak resident set of this process (VmHWM), None where not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _release_freed() -> None:
    """Return freed heap memory to the system where the C library can (glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory while the ``with`` block runs (``peak_mib``, ``start_mib``, ``growth_mib``)."""

    def __init__(self, device: torch.device | str = "cpu", release_freed: bool = False):
        self.device = torch.device(device)
        self.release_freed = release_freed
        self.start_mib = self.peak_mib = 0.0
        self._thread = None

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.start_mib

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(0.005)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        if self.release_freed:
            _release_freed()
        start = _rss_bytes()
        self.start_mib = start / 2**20
        if not (_reset_hwm() and _hwm_bytes() is not None):
            self._peak, self._stop = start, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is None:
            peak = _hwm_bytes()
        else:
            self._stop.set()
            self._thread.join()
            peak = self._peak
        self.peak_mib = max(peak / 2**20, self.start_mib)
