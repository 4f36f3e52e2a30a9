"""``weightsmith bench {erase,merge,quality}``: measure our code beside the reference approach.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when asked for, so ``weightsmith --help`` stays fast.
"""
from __future__ import annotations

import importlib
import os
import threading
import time

BENCHES = {
    "erase": ("weightsmith.core.erase.bench", "erasure: ErasePro / zero-residual / UCE vs the public UCE algorithm"),
    "merge": ("weightsmith.core.merge.bench", "merging: streaming IterIS vs a store-all-features reference"),
    "quality": ("weightsmith.core.world.quality", "quality of every method on the embedded default world"),
}


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (speed, memory, quality) with ratios against references")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    for name, (mod, help_) in BENCHES.items():
        try:
            m = importlib.import_module(mod)   # bench modules import torch & co. lazily
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("weightsmith"):
                continue                       # that feature is not part of this build
            raise
        bp = bsub.add_parser(name, help=help_, description=help_)
        bp.add_argument("--json", action="store_true", help="print the results as JSON")
        m.add_arguments(bp)
        bp.set_defaults(func=m.run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


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
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

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
