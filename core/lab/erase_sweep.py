"""``weightsmith bench erase-sweep`` (also ``bench erase --sweep``): the zero-residual solver's knobs side by side.

docs/erase-sweep.md. On a seeded random SD-architecture model (SD1.5 size by default; ``--family
sdxl``: the reduced SDXL architecture; ``--quick``: the tiny SD1 model and three settings), the same
erasure (targets ``van gogh``, ``monet`` → ``art``, preserve ``picasso``) is run with ErasePro under
each setting of :data:`SWEEP` (plus ``zero-residual`` and ``uce`` for reference), and printed
(the ratios are :mod:`weightsmith.core.lab.measures`' ``kv_residual`` and ``kv_drift``):

- ``ρ edit``: mean over the UNet cross-attention ``to_k``/``to_v`` of
  ``‖W' X' − W_o Y‖ / ‖W_o (Y − X⁰)‖`` on the edit's own prompts, over **every** paired row
  (concept, template suffix, EOS and all padding — the rows the UNet reads), whatever the setting
  solved on; ``X'`` are the target features of the edited encoders, ``X⁰`` of the original ones;
- ``ρ solved``: the same ratio on the rows the solver was given (``residual_after`` of the report; it
  differs from ``ρ edit`` when ``max_pad`` drops padding rows);
- ``ρ held``: as ``ρ edit`` on held-out prompts (other templates and contexts, not used by the edit);
- ``drift``: mean over the same matrices of ``‖W' P' − W_o P⁰‖ / ‖W_o P⁰‖`` on held-out preserve
  prompts (the preserve concept in the held-out templates, and ordinary captions not in the shipped
  preserve list), all tokens;
- ``‖Δ‖/‖W‖`` per stage: mean over the stage's matrices (each text-encoder layer's ``k_proj``/
  ``v_proj``; the UNet's cross-attention ``to_k``/``to_v``), and whether it falls with depth
  (Spearman correlation of the text-encoder layers' values with the layer index, and how many
  layer-to-layer steps go down).

Random weights carry no meaning: these figures describe the solver on SD-shaped features, not
erasure quality on a trained model. ``--family world`` runs the same settings on the embedded trained
world (World v2) with its own erasure (circle → square, the other shapes preserved; :func:`world_spec`),
and ``--samples N`` adds the judge-read erasure and preservation on held-out prompts per setting.
"""

from __future__ import annotations

import json

from .erase_bench import ANCHOR, HELD_OUT, PRESERVE, TARGETS, heldout_prompts
from .measures import encoders_only, kv_drift, kv_residual, spearman, unet_kv_names

# ordinary captions that are not in prompts.PRESERVE_CAPTIONS (held-out preservation)
DRIFT_CAPTIONS = (
    "a kitchen with a blue door and a cat on a chair",
    "two boats on a lake in the morning",
    "a child reading a book under a lamp",
    "a train crossing a bridge in the snow",
)

# (label, method, EraseOptions fields); the first row is today's default
SWEEP = (
    ("auto (default)", "erasepro", {}),
    ("ridge 0 (exact)", "erasepro", {"ridge": 0}),
    ("ridge 1e-3", "erasepro", {"ridge": 1e-3}),
    ("ridge 1e-4", "erasepro", {"ridge": 1e-4}),
    ("cond_limit 1e-4", "erasepro", {"cond_limit": 1e-4}),
    ("max_pad 0", "erasepro", {"max_pad": 0}),
    ("max_pad 4", "erasepro", {"max_pad": 4}),
    ("max_pad 0, ridge 0", "erasepro", {"max_pad": 0, "ridge": 0}),
    ("max_pad 4, ridge 0", "erasepro", {"max_pad": 4, "ridge": 0}),
    ("split 1e-1", "erasepro", {"exact_subspace": 1e-1}),
    ("split 1e-2", "erasepro", {"exact_subspace": 1e-2}),
    ("split 1e-3", "erasepro", {"exact_subspace": 1e-3}),
    ("merge 0.05", "erasepro", {"merge_tol": 0.05}),
    ("merge 0.05, ridge 0", "erasepro", {"merge_tol": 0.05, "ridge": 0}),
    ("merge 0.2, ridge 0", "erasepro", {"merge_tol": 0.2, "ridge": 0}),
    ("max_pad 4, split 1e-2", "erasepro", {"max_pad": 4, "exact_subspace": 1e-2}),
    ("zero-residual (default)", "zero-residual", {}),
    ("zero-residual, ridge 0", "zero-residual", {"ridge": 0}),
    ("uce", "uce", {"expand_prompts": False, "preserve_captions": False}),
)
QUICK = ("auto (default)", "ridge 0 (exact)", "split 1e-2")
# the reduced SDXL run (two encoders, slower per setting): the settings that bracket the SD1 table
SDXL = (
    "auto (default)",
    "ridge 0 (exact)",
    "ridge 1e-3",
    "max_pad 4",
    "max_pad 0, ridge 0",
    "split 1e-1",
    "split 1e-2",
    "merge 0.05",
    "merge 0.2, ridge 0",
    "zero-residual (default)",
    "uce",
)


def _stage_label(stage: str) -> str:
    if stage == "unet":
        return "U"
    comp, _, layer = stage.partition(".layer")
    return ("b" if comp.endswith("_2") else "L") + layer


def random_model_spec() -> dict:
    """The erasure the sweep runs on a random SD-architecture model (see the module docstring)."""
    from ..erase.prompts import PRESERVE_CAPTIONS

    assert not set(DRIFT_CAPTIONS) & set(PRESERVE_CAPTIONS)
    held_t, held_a = heldout_prompts()
    return {
        "targets": list(TARGETS),
        "anchors": [ANCHOR],
        "preserve": list(PRESERVE),
        "options": {},
        "held_t": held_t,
        "held_a": held_a,
        "drift_prompts": [t.format(p) for p in PRESERVE for t in HELD_OUT] + list(DRIFT_CAPTIONS),
    }


def world_spec(n: int = 24) -> dict:
    """The embedded world's erasure, as the demo and ``bench quality`` run it (circle → square, the
    other shapes preserved, computed from ``ERASE_TEMPLATES`` only); held-out prompts are the quality
    bench's context and two-object prompts (``n`` each), drift prompts its preserved-shape prompts."""
    from ..world.evaluate import ERASE_ANCHOR, ERASE_OPTIONS, ERASE_TARGET, PRESERVE_SHAPES, erase_prompt_sets

    sets = erase_prompt_sets(n)
    held = sets["context"] + [t[0] for t in sets["two"]]
    return {
        "targets": [ERASE_TARGET],
        "anchors": [ERASE_ANCHOR],
        "preserve": list(PRESERVE_SHAPES),
        "options": dict(ERASE_OPTIONS),
        "held_t": held,
        "held_a": [h.replace(ERASE_TARGET, ERASE_ANCHOR) for h in held],
        "drift_prompts": [t[0] for t in sets["preserved"]],
    }


def sweep(model, settings=SWEEP, progress=None, spec: dict | None = None, keep_edits: bool = False) -> list[dict]:
    """Run every setting on ``model``; one result row per setting (see the module docstring).
    ``spec``: the erasure and its held-out prompts (default :func:`random_model_spec`); ``keep_edits``:
    each row also holds its edit as ``edit`` (for :func:`judge_rows`, which removes it)."""
    from ..erase import EraseOptions, erase

    spec = spec or random_model_spec()
    held_t, held_a, drift_prompts = spec["held_t"], spec["held_a"], spec["drift_prompts"]
    rows = []
    for label, method, fields in settings:
        if progress:
            progress(label)
        edit = erase(
            model,
            spec["targets"],
            spec["anchors"],
            spec["preserve"],
            method,
            EraseOptions(**{**spec["options"], **fields}),
            warn=lambda m: None,
        )
        enc = encoders_only(model, edit) if method == "erasepro" else model
        rep = edit.report
        stages = {}
        for s in rep["summary"]:
            stages[s["stage"]] = s["delta_rel_mean"]
        unet = [s for s in rep["stages"] if s["stage"] == "unet"]
        row = {
            "setting": label,
            "method": method,
            "options": fields,
            "rho_edit": kv_residual(model, enc, edit.deltas, rep["prompts"]["targets"], rep["prompts"]["anchors"]),
            "rho_solved": sum(s["residual_after"] for s in unet) / len(unet),
            "rho_heldout": kv_residual(model, enc, edit.deltas, held_t, held_a),
            "drift_heldout": kv_drift(model, enc, edit.deltas, drift_prompts),
            "delta_rel": stages,
            "solvers": sorted({s["solver"] for s in rep["stages"]}),
            "unet_features": unet[0]["features"],
            "unet_solved_columns": unet[0]["solved_columns"],
            "unet_rank": unet[0]["rank"],
            "unet_exact_rank": unet[0]["exact_rank"],
        }
        depth = {}
        for comp in model.text_encoders:
            ys = [v for k, v in stages.items() if k.startswith(comp + ".layer")]
            if len(ys) >= 3:
                depth[comp] = {
                    "spearman": spearman(ys),
                    "spearman_from_1": spearman(ys[1:]),
                    "falls": sum(b < a for a, b in zip(ys, ys[1:])),
                    "steps": len(ys) - 1,
                    "first": ys[0],
                    "last": ys[-1],
                    "max_layer": ys.index(max(ys)),
                }
        row["depth"] = depth
        if keep_edits:
            row["edit"] = edit
        rows.append(row)
        del edit, enc
    return rows


JUDGE_COLS = (
    ("target_context", "circle ctx"),
    ("target_two", "circle two"),
    ("target_simple", "circle simple"),
    ("preserved", "others ok"),
    ("drift", "img drift"),
)


def judge_rows(model, rows, n: int, progress=None) -> None:
    """Judge-read erasure and preservation on the world's held-out prompts (``bench quality``'s
    definitions, ``n`` images per set, 20 steps), added to each row as ``judge``; the base model's
    figures to every row as ``judge_base``; each row's ``edit`` is dropped."""
    from ..world.evaluate import Sampler, erasure_metrics

    if progress:
        progress(f"judging {len(rows)} settings, {n} images per set")
    ev = erasure_metrics(model, {r["setting"]: r.pop("edit").apply(model) for r in rows}, n=n, sampler=Sampler())
    for r in rows:
        r["judge"] = ev["metrics"][r["setting"]]
        r["judge_base"] = ev["metrics"]["base"]


def print_table(rows, title, out=print) -> None:
    from .tables import fmt_judge

    out(title)
    out(
        f"{'setting':<24}{'solver':>12}{'cols':>11}{'ρ edit':>9}{'ρ solved':>10}{'ρ held':>9}{'drift':>9}"
        f"{'U ‖Δ‖/‖W‖':>11}{'TE ‖Δ‖/‖W‖':>12}{'depth r':>9}"
    )
    for r in rows:
        te = [v for k, v in r["delta_rel"].items() if k != "unet"]
        dep = [d["spearman"] for d in r["depth"].values()]
        cols = f"{r['unet_solved_columns']}/{r['unet_features']}"
        out(
            f"{r['setting']:<24}{'+'.join(r['solvers']):>12}{cols:>11}{r['rho_edit']:>9.3f}{r['rho_solved']:>10.3f}"
            f"{r['rho_heldout']:>9.3f}{r['drift_heldout']:>9.4f}{r['delta_rel'].get('unet', 0):>11.4f}"
            f"{(sum(te) / len(te) if te else float('nan')):>12.4f}"
            f"{('/'.join(f'{x:+.2f}' for x in dep) if dep else '-'):>9}"
        )
    if rows and "judge" in rows[0]:
        out("")
        out(
            "judge-read on held-out prompts (rate [95% Wilson interval]; img drift: mean pixel change on the "
            f"preserved-shape prompts), n = {rows[0]['judge']['preserved']['n']} per set"
        )
        out(f"{'setting':<24}" + "".join(f"{t:>20}" for _, t in JUDGE_COLS))
        for name, m in [("base", rows[0]["judge_base"])] + [(r["setting"], r["judge"]) for r in rows]:
            out(f"{name:<24}" + "".join(f"{fmt_judge(m[k]):>20}" for k, _ in JUDGE_COLS))
    labels = list(dict.fromkeys(k for r in rows for k in r["delta_rel"]))
    out("")
    out("‖Δ‖/‖W‖ per stage (mean over the stage's matrices; L<l>: text-encoder layer l, b<l>: second encoder, U: UNet)")
    out(f"{'setting':<24}" + "".join(f" {_stage_label(k):>8}" for k in labels))
    for r in rows:
        out(
            f"{r['setting']:<24}"
            + "".join(f" {r['delta_rel'][k]:>8.4g}" if k in r["delta_rel"] else f" {'-':>8}" for k in labels)
        )
    out("")
    out(
        "does ‖Δ‖/‖W‖ fall with depth? (Spearman r of the text-encoder layers' values against the layer index, "
        "over all layers and from layer 1 on)"
    )
    for r in rows:
        for comp, d in r["depth"].items():
            out(
                f"depth, {r['setting']}, {comp}: r = {d['spearman']:+.2f} (from layer 1: {d['spearman_from_1']:+.2f}), "
                f"{d['falls']}/{d['steps']} steps fall, layer 0 {d['first']:.4g}, peak at layer {d['max_layer']}, "
                f"last {d['last']:.4g}: " + _verdict(d)
            )


def _verdict(d) -> str:
    if d["spearman"] <= -0.8 and d["last"] < d["first"]:
        return "falls with depth"
    if d["spearman_from_1"] <= -0.8:
        return "falls from layer 1 on" + (" (layer 0 lower than the last layer)" if d["first"] < d["last"] else "")
    return "does not fall with depth"


def add_arguments(p) -> None:
    p.add_argument(
        "--family",
        choices=("sd1", "sdxl", "world"),
        default="sd1",
        help="sd1 (SD1.5 architecture) or sdxl (the reduced SDXL architecture: see "
        "core/lab/random_models.py, size 'reduced'), both random; world: the embedded trained "
        "world and its circle -> square erasure",
    )
    p.add_argument(
        "--size",
        choices=("full", "tiny"),
        default="full",
        help="sd1: full: SD1.5 architecture (default); tiny: a quick smoke run",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--samples",
        type=int,
        default=0,
        help="--family world only: also judge-read erasure and preservation on held-out prompts, "
        "this many images per prompt set and setting (0: residuals only)",
    )
    p.add_argument("--quick", action="store_true", help="tiny model and three settings (smoke run)")


def run(args) -> int:
    import sys

    import torch

    from .random_models import build_random_model

    torch.manual_seed(args.seed)
    if args.quick:
        family = "world" if args.family == "world" else "sd1"
        size, settings = "tiny", [s for s in SWEEP if s[0] in QUICK]
    else:
        family = args.family
        size = "reduced" if family == "sdxl" else args.size
        settings = [s for s in SWEEP if s[0] in SDXL] if family == "sdxl" else SWEEP
    progress = None if args.json else (lambda lab: print(f"  running {lab} …", file=sys.stderr, flush=True))
    if family == "world":
        from ..model_io import load_model
        from ..world.paths import DEFAULT_MODEL_DIR

        model = load_model(DEFAULT_MODEL_DIR)
        spec = world_spec()
        rows = sweep(model, settings, progress=progress, spec=spec, keep_edits=bool(args.samples))
        title = (
            f"erase solver sweep on the embedded world ({DEFAULT_MODEL_DIR.name}): circle → 'square', preserve "
            f"{', '.join(spec['preserve'])}; held-out: {len(spec['held_t'])} context / two-object prompts; "
            f"UNet means over {len(unet_kv_names(model))} to_k/to_v matrices"
        )
        if args.samples:
            judge_rows(model, rows, args.samples, progress)
    else:
        model = build_random_model(family, size, seed=args.seed)
        _ = model.unet
        rows = sweep(model, settings, progress=progress)
        title = (
            f"erase solver sweep on the {family} random model, size={size}, seed={args.seed}: targets "
            f"{', '.join(TARGETS)} → {ANCHOR!r}, preserve {', '.join(PRESERVE)}; UNet means over "
            f"{len(unet_kv_names(model))} to_k/to_v matrices"
        )
    if args.json:
        print(json.dumps({"model": title, "rows": rows}, indent=2))
    else:
        print_table(rows, title)
    return 0
