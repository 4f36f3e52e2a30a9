"""``weightsmith bench quality``: how well each method works, measured on the embedded world.

Fixed seeds, stated sample sizes and a 95% interval beside every figure; every number is read
off generated images by the shipped judge (definitions: :mod:`weightsmith.core.world.evaluate`).
Evaluation prompts are held out from every prompt an edit or a merge is computed from.

- Erasure ``circle`` → ``square`` (preserving triangle, cross, diamond; the demo's prompts) with
  uce, zero-residual and erasepro: target rate on simple, context and two-object prompts, anchor
  rate, the other object of the two-object prompts, preserved shapes, drift, edit time and
  ‖Δ‖/‖W‖ per stage.
- Merging, on the clean pair (LoRAs trained with regularization images) and on the interfering
  pair (the same traits, no regularization, the same modules): each LoRA alone and every merge
  method with its defaults: each trait, the other LoRA's leak, both-trigger composition, drift
  on prompts with no trigger, merge time.
"""

from __future__ import annotations

import json
import time

MERGE_METHODS = ("linear", "concat", "svd", "ties", "dare", "regmean", "iteris")
ERASE_METHODS = ("uce", "zero-residual", "erasepro")


def add_arguments(p) -> None:
    p.add_argument("--samples", type=int, default=48, help="images per prompt set and method (default 48)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (4 images per set, 6 steps, IterIS with 1 iteration): checks the pipeline, "
        "its figures mean nothing",
    )
    p.add_argument("--pairs", default="clean,interfering", help="LoRA pairs to merge (comma-separated)")
    p.add_argument("--skip-merge", action="store_true")
    p.add_argument("--skip-erase", action="store_true")


def erase_section(model, n: int, sampler, methods=ERASE_METHODS, options=None) -> dict:
    from ..world.evaluate import erasure_metrics
    from .demo import run_erasures

    edits = run_erasures(model, methods=methods, options=options)
    ev = erasure_metrics(model, {m: e.apply(model) for m, e in edits.items()}, n=n, sampler=sampler)
    ev["edit_time_s"] = {m: e.report["time_s"] for m, e in edits.items()}
    ev["delta_rel"] = {m: {s["stage"]: s["delta_rel_mean"] for s in e.report["summary"]} for m, e in edits.items()}
    return ev


def merge_section(
    model,
    pair: str,
    n: int,
    sampler,
    quick: bool = False,
    methods=MERGE_METHODS,
    settings=None,
    progress=None,
    seed0: int = 300,
) -> dict:
    """Each LoRA of ``pair`` alone and every merge, judge-read on ``n`` images per set. ``settings``:
    ``(label, method, MergeOptions fields)`` rows (default: each of ``methods`` with its defaults);
    ``quick``: 1 iteration, 2 samples of 2 steps under every row's own fields; ``seed0``: the first
    evaluation seed."""
    from ..lora_read import load_lora
    from ..merge import MergeOptions, merge
    from ..world.evaluate import merge_metrics, merge_sample_prompts, pair_paths, with_lora

    loras = [load_lora(p, model) for p in pair_paths(pair)]
    models = {"subject only": with_lora(model, loras[0]), "style only": with_lora(model, loras[1])}
    base = dict(iterations=1, samples=2, steps=2) if quick else {}
    times = {}
    for label, m, fields in settings or [(m, m, {}) for m in methods]:
        if progress:
            progress(label)
        opts = MergeOptions(**{**base, **fields})
        e = merge(model, loras, method=m, options=opts, prompts=merge_sample_prompts(opts.samples, pair))
        times[label] = e.report.get("time_s")
        models[label] = e.apply(model)
    if progress:
        progress(f"judging {len(models) + 1} models, {n} images per set")
    mv = merge_metrics(model, models, n=n, sampler=sampler, pair=pair, seed0=seed0)
    mv["merge_time_s"] = times
    return mv


def run(args) -> int:
    from ..errors import WeightsmithError
    from ..model_io import load_model
    from ..world.evaluate import PAIRS, Sampler
    from ..world.paths import DEFAULT_MODEL_DIR, require_world
    from .tables import ERASE_COLS, MERGE_COLS, print_metrics

    require_world()
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    bad = [p for p in pairs if p not in PAIRS]
    if bad:
        raise WeightsmithError(f"unknown LoRA pair(s) {bad}; choose from {', '.join(PAIRS)}.")
    n, steps = (4, 6) if args.quick else (args.samples, args.steps)
    if n < 1 or steps < 1:
        raise WeightsmithError("--samples and --steps must be at least 1.")
    t0 = time.perf_counter()
    model = load_model(DEFAULT_MODEL_DIR)
    sampler = Sampler(steps=steps)
    result: dict = {"model": DEFAULT_MODEL_DIR.name, "samples_per_set": n, "steps": steps, "quick": args.quick}
    if not args.skip_erase:
        result["erase"] = erase_section(model, n, sampler)
    if not args.skip_merge:
        result["merge"] = {p: merge_section(model, p, n, sampler, quick=args.quick) for p in pairs}
    result["time_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"quality benchmark on the embedded world ({n} images per prompt set, {steps} steps, fixed seeds, "
        f"held-out prompts; judge-read; value [95% interval])"
    )
    sections = []
    if "erase" in result:
        sections.append(("erasure circle -> square", result["erase"], ERASE_COLS))
    for p, mv in result.get("merge", {}).items():
        sections.append((f"merging the {p} pair ({' / '.join(mv['triggers'])})", mv, MERGE_COLS))
    for title, sec, cols in sections:
        print_metrics(title, sec["metrics"], cols)
        if "edit_time_s" in sec:
            for m, t in sec["edit_time_s"].items():
                stages = ", ".join(f"{k} {v:.3g}" for k, v in sec["delta_rel"][m].items())
                print(f"  {m}: edit {t:.2f} s; mean ||dW||/||W|| per stage: {stages}")
        if "merge_time_s" in sec:
            print("  merge time (s): " + ", ".join(f"{m} {t:.2f}" for m, t in sec["merge_time_s"].items() if t))
    print(f"total {result['time_s']} s")
    return 0
