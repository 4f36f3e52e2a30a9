"""``weightsmith bench {erase,erase-sweep,merge,merge-sweep,quality}``: measure our code beside the
reference approach, or sweep a solver's knobs.

Each benchmark module exposes ``add_arguments(parser)`` (its own options only) and ``run(args) -> int``;
they are imported only when asked for, so ``weightsmith --help`` stays fast. The sweeps' old spellings,
``bench erase --sweep …`` and ``bench merge --sweep …``, still work (:func:`resolve_aliases`).
"""

from __future__ import annotations

import importlib

BENCHES = {
    "erase": (
        "weightsmith.core.lab.erase_bench",
        "erasure: ErasePro / zero-residual / UCE vs the public UCE algorithm",
    ),
    "erase-sweep": (
        "weightsmith.core.lab.erase_sweep",
        "erasure: the zero-residual solver's knobs (ridge, cond_limit fallback, max_pad, exact_subspace, "
        "merge_tol) side by side: ρ on the edit and held-out prompts, drift on held-out preserve "
        "prompts and ‖Δ‖/‖W‖ per stage (docs/erase-sweep.md)",
    ),
    "merge": ("weightsmith.core.lab.merge_bench", "merging: streaming IterIS vs a store-all-features reference"),
    "merge-sweep": (
        "weightsmith.core.lab.merge_sweep",
        "merging: the embedded world's LoRA pair under IterIS's levers (ridge, what it pulls toward, "
        "iterations, λ, untouched rule, samples, steps) beside linear and RegMean, each merge judged "
        'on held-out prompts (docs/merge.md, "World v2 sweep")',
    ),
    "quality": ("weightsmith.core.lab.quality", "quality of every method on the embedded default world"),
    "robustness": (
        "weightsmith.core.lab.robustness_bench",
        "erasure under attack on the embedded world: attack success rate per method and hardening rounds "
        "(continuous, discrete, closed-form attacks at two budgets), preserved shapes, drift, edit time "
        "(docs/robustness.md)",
    ),
}
# old spelling -> bench: `bench erase --sweep ARGS` is `bench erase-sweep ARGS`
ALIASES = {("erase", "--sweep"): "erase-sweep", ("merge", "--sweep"): "merge-sweep"}


def resolve_aliases(argv: list[str]) -> list[str]:
    """The command line with an old spelling (``bench erase --sweep …``) replaced by its bench
    (``bench erase-sweep …``); any other command line unchanged."""
    argv = list(argv)
    if len(argv) >= 2 and argv[0] == "bench":
        for (name, flag), bench in ALIASES.items():
            if argv[1] == name and flag in argv[2:]:
                rest = argv[2:]
                rest.remove(flag)
                return ["bench", bench, *rest]
    return argv


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (speed, memory, quality) with ratios against references")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    aliases = {bench: f"{name} {flag}" for (name, flag), bench in ALIASES.items()}
    for name, (mod, help_) in BENCHES.items():
        try:
            m = importlib.import_module(mod)  # bench modules import torch & co. lazily
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("weightsmith"):
                continue  # that feature is not part of this build
            raise
        desc = help_ + (f" (also spelled `bench {aliases[name]}`)" if name in aliases else "")
        bp = bsub.add_parser(name, help=help_, description=desc)
        bp.add_argument("--json", action="store_true", help="print the results as JSON")
        m.add_arguments(bp)
        bp.set_defaults(func=m.run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
