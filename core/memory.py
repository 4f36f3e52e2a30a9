"""Memory facts of this process and machine, and the default memory budget (docs/merge.md, "Memory").

Torch-free except where a CUDA device is asked about.
"""

from __future__ import annotations

import os
import threading
import time

#: share of the machine's memory a job may use by default: the rest is left to the OS, the host UI
#: and its other models (on a 24 GB machine: 15.6 GB)
DEFAULT_SHARE = 0.65

GIB = 2**30

#: precisions a model's UNet weights can be held in (``load_model(weights_dtype=…)``; computed in float32)
WEIGHT_PRECISIONS = ("float32", "bfloat16", "float16")


def rss() -> int:
    """Resident memory of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def total_bytes(device="cpu") -> int | None:
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[1])
    return _meminfo("MemTotal")


def used_bytes(device="cpu") -> int:
    """What this process holds where the statistics live: RSS on the CPU, allocated memory on CUDA."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.memory_allocated(torch.device(device)))
    return rss()


def available_bytes(device="cpu") -> int | None:
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return _meminfo("MemAvailable")


def default_budget(device="cpu") -> int | None:
    """``min(DEFAULT_SHARE × total, used now + 0.9 × available now)``, in bytes (None if unknown)."""
    tot, av = total_bytes(device), available_bytes(device)
    if tot is None:
        return None
    cap = int(DEFAULT_SHARE * tot)
    if av is not None:
        cap = min(cap, free_budget(device))
    return cap


def free_budget(device="cpu") -> int | None:
    """``used now + 0.9 × available now``: everything the machine can still give this process (the
    default budget's fallback for a process, such as a web UI with its model loaded, that already
    holds most of :data:`DEFAULT_SHARE`)."""
    av = available_bytes(device)
    return None if av is None else used_bytes(device) + int(0.9 * av)


def gib(n: float | None) -> str:
    """A size for people: ``15.3 GB``; below 0.1 GB in MB (``37 MB``), so no size reads as 0.0 GB."""
    if n is None:
        return "?"
    return f"{n / GIB:.1f} GB" if abs(n) >= 0.1 * GIB else f"{n / 2**20:.0f} MB"


def release_free_heap(collect: bool = True) -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Freed float64 statistics of a few MB sit below glibc's mmap threshold, so they stay in the heap,
    counted in the process's memory, until something trims it: measured on the SDXL memory bench,
    2.3 GB of free heap right after the first pass (docs/merge.md, "Memory"). ``collect``: run
    Python's garbage collector first (tensors held only by reference cycles)."""
    import ctypes
    import gc

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every few milliseconds.

    PyTorch's CPU allocations do not show in tracemalloc, so the process RSS is the honest measure.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        return rss()

    def __enter__(self):
        import gc

        gc.collect()
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())
        self.mib = (self.peak - self.base) / 2**20
        return False
