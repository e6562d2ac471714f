"""Timing and peak-memory measurement shared by the benchmarks in this folder.

Peak extra memory:
  * CUDA: torch.cuda.max_memory_allocated() above the allocation before the call.
  * CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above
    the resident set before the call. Large buffers must come from mmap and go back on free
    for this to see every call, so the benchmarks re-exec themselves with a fixed
    MALLOC_MMAP_THRESHOLD_ (see ensure_malloc_env).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def ensure_malloc_env() -> None:
    """Re-exec this interpreter once with glibc malloc returning large blocks to the OS."""
    if all(os.environ.get(k) == v for k, v in _MMAP_ENV.items()):
        return
    os.environ.update(_MMAP_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 2, repeats: int = 5,
            max_seconds: float = 20.0) -> float:
    """Median wall time of fn() in milliseconds (after warm-up), bounded by max_seconds total."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory fn() allocates beyond what was live before it (outputs included)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    from megarl.procmem import reset_peak, status_bytes

    reset_peak()  # VmHWM := the current VmRSS
    base = status_bytes("VmRSS")
    out = fn()
    peak = status_bytes("VmHWM") - base
    del out
    return max(peak, 0)


@dataclass
class Case:
    """One benchmark row: a baseline and megarl's implementation of the same computation."""

    op: str
    shape: str
    baseline: Callable[[], Any]
    megarl: Callable[[], Any]
    baseline_name: str = "reference"
    target: str = ""
    bytes_moved: int | None = None  # for achieved GB/s on GPU
    extra: dict = field(default_factory=dict)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def machine_line(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"device={device.type} ({what}); torch {torch.__version__}; python {platform.python_version()}"
