"""``weightsmith bench {erase,merge,quality}``: measure our code beside the reference approach.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int``; they are
imported only when asked for, so ``weightsmith --help`` stays fast.
"""
from __future__ import annotations

import importlib

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


