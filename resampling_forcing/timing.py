"""Device sync, peak memory and wall-time measurement: the one copy the sampler and bench/ share.

On CUDA, kernels run asynchronously: a host timer only measures them between two
:func:`sync` calls (or with CUDA events, :func:`time_fn`). On CPU every helper is a plain
``time.perf_counter`` reading and sync is a no-op.

Memory: :func:`peak_memory` is CUDA's max allocated bytes since :func:`reset_peak_memory`, else the
process's peak RSS (never reset). Linux can reset the peak RSS (``VmHWM``): :func:`reset_peak_rss`
/ :func:`peak_rss_mib`, used to measure one run inside a longer process.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch

DeviceLike = Union[str, torch.device]

__all__ = ["sync", "reset_peak_memory", "peak_memory", "rss_mib", "reset_peak_rss", "peak_rss_mib",
           "Stopwatch", "median", "time_fn"]


def _is_cuda(device: Optional[DeviceLike]) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def sync(device: Optional[DeviceLike]) -> None:
    """Wait for the work queued on a CUDA ``device`` (no-op on CPU / None)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def reset_peak_memory(device: Optional[DeviceLike]) -> None:
    """Start a new CUDA peak for :func:`peak_memory` (no-op on CPU: the process peak RSS cannot be reset)."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: DeviceLike) -> tuple[float, str]:
    """(MiB, kind): CUDA max allocated since the last reset, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 1024), "process_peak_rss"


def rss_mib() -> float:
    """The process's current resident set size in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux ``VmHWM``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> Optional[float]:
    """The process's peak RSS (``VmHWM``, since :func:`reset_peak_rss`) in MiB; None without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Stopwatch:
    """Wall seconds of a ``with`` block, the device synchronised at both ends::

        with Stopwatch(device) as sw:
            out = model(x)
        sw.seconds
    """

    def __init__(self, device: Optional[DeviceLike] = None):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def median(values: Sequence[float]) -> float:
    """The middle value of the sorted ``values`` (the upper one of the two middles for an even count)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def time_fn(fn: Callable[[], Any], device: Optional[DeviceLike], warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones.

    CUDA: CUDA events around each call (the GPU time of the queued work); CPU: perf_counter.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, reps)):
        if _is_cuda(device):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return median(times)
