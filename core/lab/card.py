"""The model card's measured figures for the embedded world (``python -m weightsmith.core.lab.card``).

Prints, with sample sizes and 95% Wilson intervals:
- the three quality bars of the base model: simple prompts (shape and colour right), one object
  with size, position and background in the prompt (everything right), two-object prompts (both
  objects' shape and colour at their places);
- the conditioning geometry of the demo's erasure: text width ``d``, the number of feature
  columns the edit constrains and their numerical rank;
- the calibration against UCE's known behaviour: ``uce`` circle → square with default options
  (and with the demo's options), target rate on held-out context prompts and preserved shapes,
  relative to the base model.
"""

from __future__ import annotations

import argparse
import json

from .tables import fmt_percent


def quality_bars(model, n: int = 140, steps: int = 25) -> dict:
    from ..world.metrics import scene_prompt_quality, simple_prompt_quality, wilson

    s = simple_prompt_quality(model, seeds_per_prompt=max(1, n // 35), steps=steps)
    k = round(s["both"] * s["n"])  # both = k / n
    out = {"simple": {"rate": k / s["n"], "k": k, "n": s["n"], "ci": list(wilson(k, s["n"]))}}
    for kind in ("context", "two"):
        r = scene_prompt_quality(model, kind, n=n, steps=steps)
        out[kind] = {k: r[k] for k in ("rate", "k", "n", "ci", "breakdown") if k in r}
    return out


def feature_geometry(sd_model) -> dict:
    """d, feature columns and numerical rank of the demo's erasure (the UNet k/v input features)."""
    import torch

    from ..erase.pipeline import Encoders, EraseOptions, build_prompts, gather
    from ..world.evaluate import ERASE_ANCHOR, ERASE_OPTIONS, ERASE_TARGET, PRESERVE_SHAPES

    opts = EraseOptions(**ERASE_OPTIONS)
    ps = build_prompts([ERASE_TARGET], [ERASE_ANCHOR], list(PRESERVE_SHAPES), opts, False)
    enc = Encoders(sd_model, ps, opts)
    first = next(iter(sd_model.tokenizers))
    X = gather(sd_model.encode(ps.targets).context, enc.pairs[first][0]).double()  # (d, columns)
    sv = torch.linalg.svdvals(X)
    return {
        "d": int(X.shape[0]),
        "feature_columns": int(X.shape[1]),
        "rank_rcond_1e-6": int((sv > sv[0] * 1e-6).sum()),
        "rank_rcond_1e-2": int((sv > sv[0] * 1e-2).sum()),
        "target_prompts": len(ps.targets),
    }


def calibration(sd_model, n: int = 48, steps: int = 20) -> dict:
    from ..erase import EraseOptions, erase
    from ..world.evaluate import ERASE_ANCHOR, ERASE_OPTIONS, ERASE_TARGET, PRESERVE_SHAPES, Sampler, erasure_metrics

    edits = {
        "uce (defaults)": erase(sd_model, [ERASE_TARGET], [ERASE_ANCHOR], method="uce"),
        "uce (demo options)": erase(
            sd_model,
            [ERASE_TARGET],
            [ERASE_ANCHOR],
            preserve=list(PRESERVE_SHAPES),
            method="uce",
            options=EraseOptions(**ERASE_OPTIONS),
        ),
    }
    ev = erasure_metrics(sd_model, {k: e.apply(sd_model) for k, e in edits.items()}, n=n, sampler=Sampler(steps=steps))
    m = ev["metrics"]
    base = m["base"]
    for k in edits:
        b = base["target_context"]["rate"]
        m[k]["context_drop_rel"] = (b - m[k]["target_context"]["rate"]) / b if b else float("nan")
        m[k]["preserved_minus_base"] = m[k]["preserved"]["rate"] - base["preserved"]["rate"]
    return ev


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    ap.add_argument("--n", type=int, default=140, help="samples per quality bar")
    ap.add_argument("--calibration-n", type=int, default=48, help="samples per prompt set of the calibration")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: bars,geometry,calibration")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    import torch

    from ..model_io import load_model as load_sd
    from ..world.paths import DEFAULT_MODEL_DIR
    from ..world.sample import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    path = a.model or str(DEFAULT_MODEL_DIR)
    skip = set(a.skip.split(","))
    res: dict = {"model": path}
    if "bars" not in skip:
        res["bars"] = quality_bars(load_model(path), n=a.n)
        for k, v in res["bars"].items():
            print(f"bar {k}: {fmt_percent(v)}", flush=True)
            if "breakdown" in v:
                print(
                    f"  what the {k} bar reads: "
                    + ", ".join(f"{attr} {x:.1%}" for attr, x in v["breakdown"].items() if attr != "n"),
                    flush=True,
                )
    sd = load_sd(path)
    if "geometry" not in skip:
        res["geometry"] = feature_geometry(sd)
        print("geometry:", json.dumps(res["geometry"]), flush=True)
    if "calibration" not in skip:
        ev = calibration(sd, n=a.calibration_n)
        res["calibration"] = ev["metrics"]
        for k, m in ev["metrics"].items():
            print(
                f"calibration {k}: context {fmt_percent(m['target_context'])}, "
                f"simple {fmt_percent(m['target_simple'])}, "
                f"two {fmt_percent(m['target_two'])}, preserved {fmt_percent(m['preserved'])}"
                + (
                    f", context drop {m['context_drop_rel']:.1%}, preserved - base {m['preserved_minus_base']:+.1%}"
                    if "context_drop_rel" in m
                    else ""
                ),
                flush=True,
            )
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
