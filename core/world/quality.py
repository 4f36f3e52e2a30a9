"""``weightsmith bench quality``: how well each method works, measured on the embedded world.

Fixed seeds and stated sample sizes; every number is read off generated images by the shipped
judge (see :mod:`weightsmith.core.world.evaluate` for the definitions).
"""
from __future__ import annotations

import json
import time

MERGE_METHODS = ("linear", "concat", "svd", "ties", "iteris")


def add_arguments(p) -> None:
    p.add_argument("--samples", type=int, default=21, help="images per prompt set and method (default 21)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--skip-merge", action="store_true")
    p.add_argument("--skip-erase", action="store_true")


def run(args) -> int:
    from ..errors import WeightsmithError
    from ..model_io import load_model
    from .evaluate import (ERASE_ANCHOR, ERASE_TARGET, Sampler, erasure_metrics, merge_metrics, merge_sample_prompts,
                           with_lora)
    from .paths import DEFAULT_MODEL_DIR, JUDGE_PATH, LORA_STYLE, LORA_SUBJECT

    if not DEFAULT_MODEL_DIR.exists() or not JUDGE_PATH.exists():
        raise WeightsmithError(f"the embedded default world is missing ({DEFAULT_MODEL_DIR}).")
    t0 = time.perf_counter()
    model = load_model(DEFAULT_MODEL_DIR)
    sampler = Sampler(steps=args.steps)
    result: dict = {"model": DEFAULT_MODEL_DIR.name, "samples_per_set": args.samples, "steps": args.steps}
    if not args.skip_erase:
        from .demo import run_erasures

        edits = run_erasures(model)
        ev = erasure_metrics(model, {m: e.apply(model) for m, e in edits.items()}, n=args.samples, sampler=sampler)
        ev["edit_time_s"] = {m: e.report["time_s"] for m, e in edits.items()}
        ev["unet_delta_rel"] = {m: next(s["delta_rel_mean"] for s in e.report["summary"] if s["stage"] == "unet")
                                for m, e in edits.items()}
        result["erase"] = ev
    if not args.skip_merge:
        from ..lora_read import load_lora
        from ..merge import MergeOptions, merge

        loras = [load_lora(LORA_SUBJECT, model), load_lora(LORA_STYLE, model)]
        models = {"subject only": with_lora(model, loras[0]), "style only": with_lora(model, loras[1])}
        times = {}
        for m in MERGE_METHODS:
            e = merge(model, loras, method=m, options=MergeOptions(iterations=6, samples=8, steps=3),
                      prompts=merge_sample_prompts(4))
            times[m] = e.report.get("time_s")
            models[m] = e.apply(model)
        mv = merge_metrics(model, models, n=args.samples, sampler=sampler)
        mv["merge_time_s"] = times
        result["merge"] = mv
    result["time_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from .demo import ERASE_COLS, MERGE_COLS

    print(f"quality benchmark on the embedded world ({args.samples} images per prompt set, {args.steps} steps, "
          f"fixed seeds; judge-read)")
    for key, cols, title in (("erase", ERASE_COLS, f"erasure {ERASE_TARGET} -> {ERASE_ANCHOR}"),
                             ("merge", MERGE_COLS, "merging subject + style")):
        if key not in result:
            continue
        print(title)
        print(f"  {'model':<14}" + "".join(f"{t[:22]:>24}" for _, t in cols))
        for name, mm in result[key]["metrics"].items():
            print(f"  {name:<14}" + "".join(f"{mm[k]:>24.3f}" for k, _ in cols))
    print(f"total {result['time_s']} s")
    return 0
