"""Measurement primitives shared by ``benchmarks/`` and the ``bench`` CLI.

* :func:`measure_time`: median and spread (inter-quartile range) of wall time after warm-up,
  synchronising CUDA around every call.
* :func:`peak_memory`: the peak of bytes allocated *during* a call, above what was live before
  it: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU, the running sum of the allocation and
  free events recorded by ``torch.profiler`` (``profile_memory=True``), which sees every tensor
  allocation made by torch's CPU allocator.
* :func:`markdown_table` and :func:`machine_description` for reports.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Sequence

import torch

__all__ = ["Timing", "measure_time", "peak_memory", "markdown_table", "machine_description"]


@dataclass
class Timing:
    """Median and inter-quartile range of repeated wall-clock times, in seconds."""

    median: float
    iqr: float
    repeats: int

    def __str__(self) -> str:
        return f"{self.median * 1e3:.3g} ms ± {self.iqr * 1e3 / 2:.2g}"


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure_time(fn: Callable[[], Any], *, repeats: int = 7, warmup: int = 2, device: str = "cpu",
                 min_time: float = 0.0) -> Timing:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` calls (at least ``min_time`` s in all)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"measure_time: repeats must be an integer >= 1, got {repeats!r}")
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all < min_time and len(times) < 100):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Timing(statistics.median(times), q[2] - q[0], len(times))


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop notices (written to file descriptor 2)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory(fn: Callable[[], Any], *, device: str = "cpu") -> int:
    """Peak bytes allocated by torch while ``fn()`` runs, above the bytes live when it starts."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def markdown_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (dicts) restricted to ``columns``."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_description(device: str = "cpu") -> str:
    """One line naming the processor/GPU, thread count and torch version."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        where = torch.cuda.get_device_name(0)
    else:
        where = platform.processor() or platform.machine()
        where = f"{where}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{where}; torch {torch.__version__}; Python {platform.python_version()}"
