"""``weightsmith bench merge-sweep`` (also ``bench merge --sweep``): IterIS's levers on the embedded
world's LoRA pairs, judge-read.

docs/merge.md, "World v2 sweep". The world's subject + style LoRAs (``--pair interfering``, the
default: trained without regularization images so that a plain sum leaks; ``clean``: trained with
them) are merged under each setting of :data:`SWEEP` — linear merging and RegMean for reference,
IterIS at its defaults and with one lever moved at a time (ridge strength and what it pulls toward,
iterations, the schedule, λ, the untouched-module rule, samples and timesteps; last, the quick settings a CPU
merge starts from, docs/merge.md "Speed") — and each merge is judged on the
quality bench's held-out prompts (``bench quality``'s definitions and seeds, ``--images N`` per set,
20 steps): each LoRA's trait, the other LoRA's leak, both-trigger composition, drift on prompts with
no trigger, merge time. Each LoRA alone is judged too. Rates carry 95% Wilson intervals.
"""

from __future__ import annotations

import json

from ..merge.options import QUICK

# (label, method, MergeOptions fields); the rows after "linear" and "regmean" move one IterIS lever
SWEEP = (
    ("linear", "linear", {}),
    ("regmean", "regmean", {}),
    ("iteris (default)", "iteris", {}),
    ("iterations 0", "iteris", {"iterations": 0}),
    ("iterations 2", "iteris", {"iterations": 2}),
    ("sequential (2 iterations)", "iteris", {"schedule": "sequential", "iterations": 2}),
    ("ridge→mean 1e-4", "iteris", {"ridge_toward": "mean", "alpha1": 1e-4, "alpha2": 1e-4}),
    ("ridge→mean 1e-2", "iteris", {"ridge_toward": "mean"}),
    ("ridge→mean 1e-1", "iteris", {"ridge_toward": "mean", "alpha1": 1e-1, "alpha2": 1e-1}),
    ("ridge→sum 3e-3", "iteris", {"ridge_toward": "sum", "alpha1": 3e-3, "alpha2": 3e-3}),
    ("ridge→sum 3e-2", "iteris", {"ridge_toward": "sum", "alpha1": 3e-2, "alpha2": 3e-2}),
    ("ridge→sum 1e-1", "iteris", {"ridge_toward": "sum", "alpha1": 1e-1, "alpha2": 1e-1}),
    ("ridge→sum 1", "iteris", {"ridge_toward": "sum", "alpha1": 1.0, "alpha2": 1.0}),
    ("λ = 1", "iteris", {"adaptive_lambda": False}),
    ("untouched zero", "iteris", {"untouched": "zero"}),
    ("samples 16", "iteris", {"samples": 16}),
    ("steps 6", "iteris", {"steps": 6}),
    ("quick (CPU default)", "iteris", dict(QUICK)),
)
QUICK = ("linear", "iterations 0")


def settings_named(labels) -> list:
    """The rows of :data:`SWEEP` with these labels, in the table's order."""
    unknown = set(labels) - {s[0] for s in SWEEP}
    if unknown:
        from ..errors import WeightsmithError

        raise WeightsmithError(
            f"unknown sweep setting(s) {sorted(unknown)}; choose from {', '.join(s[0] for s in SWEEP)}."
        )
    return [s for s in SWEEP if s[0] in labels]


def sweep(
    model, pair: str, n: int, steps: int = 20, settings=SWEEP, quick: bool = False, progress=None, seed0: int = 300
) -> dict:
    """Merge ``pair`` under every setting and judge each merge (``bench quality``'s merge section;
    ``seed0``: the first evaluation seed, 300 as there)."""
    from ..world.evaluate import Sampler
    from .quality import merge_section

    mv = merge_section(
        model, pair, n, Sampler(steps=steps), quick=quick, settings=settings, progress=progress, seed0=seed0
    )
    mv["settings"] = {label: {"method": m, "options": f} for label, m, f in settings}
    return mv


def print_table(mv: dict, out=print) -> None:
    from .tables import MERGE_COLS, fmt_interval

    out(
        f"IterIS sweep on the embedded world's {mv['pair']} pair ({' / '.join(mv['triggers'])}): "
        f"{mv['n_per_set']} images per held-out prompt set, {mv['steps']} steps, seeds {mv['seeds'][0]}-"
        f"{mv['seeds'][1]}; rate [95% Wilson interval], drift: mean pixel change on prompts with no trigger"
    )
    out(f"{'setting':<18}" + "".join(f"{k[:19]:>20}" for k, _ in MERGE_COLS) + f"{'merge s':>9}")
    for name, mm in mv["metrics"].items():
        t = mv["merge_time_s"].get(name)
        out(
            f"{name:<18}"
            + "".join(f"{fmt_interval(mm[k]):>20}" for k, _ in MERGE_COLS)
            + (f"{t:>9.1f}" if t is not None else f"{'-':>9}")
        )


def add_arguments(p) -> None:
    p.add_argument("--pair", default="interfering", help="the world's LoRA pair (interfering or clean)")
    p.add_argument("--images", type=int, default=24, help="judged images per prompt set (default 24)")
    p.add_argument("--settings", default="", help="comma-separated labels of the rows to run (default: all)")
    p.add_argument(
        "--eval-seed",
        type=int,
        default=300,
        help="first seed of the judged images (default 300, as bench quality; another "
        "value checks a choice on images it was not made on)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="two settings, 2 images per set, tiny merges (smoke run; figures mean nothing)",
    )


def run(args) -> int:
    import sys

    from ..errors import WeightsmithError
    from ..model_io import load_model
    from ..world.evaluate import PAIRS
    from ..world.paths import DEFAULT_MODEL_DIR, require_world

    require_world()
    if args.pair not in PAIRS:
        raise WeightsmithError(f"unknown LoRA pair {args.pair!r} (--pair); choose from {', '.join(PAIRS)}.")
    if args.quick:
        n, steps, settings = 2, 4, settings_named(QUICK)
    else:
        n, steps = args.images, 20
        settings = (
            settings_named([s.strip() for s in args.settings.split(",") if s.strip()]) if args.settings else list(SWEEP)
        )
    if n < 1:
        raise WeightsmithError(f"--images must be at least 1, got {n}.")
    progress = None if args.json else (lambda lab: print(f"  {lab} …", file=sys.stderr, flush=True))
    mv = sweep(
        load_model(DEFAULT_MODEL_DIR),
        args.pair,
        n,
        steps,
        settings,
        quick=args.quick,
        progress=progress,
        seed0=args.eval_seed,
    )
    if args.json:
        print(json.dumps(mv, indent=2))
    else:
        print_table(mv)
    return 0
