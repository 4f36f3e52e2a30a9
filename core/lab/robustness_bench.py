"""``weightsmith bench robustness``: does an erasure hold under attack? Measured on the embedded world
(docs/robustness.md, "The bench").

The demo's erasure, ``circle`` → ``square`` preserving triangle, cross and diamond, computed per method
(uce, zero-residual, erasepro) and hardening rounds (0, 1, 3: ``EraseOptions(harden_rounds=k)``, where
this build has the option). Every edited model is attacked by each attack at two budgets (closed-form:
two ridges), the attack learnt on images of a circle drawn by the unedited model; then the judge reads
``--samples`` images the edited model draws under the attack, on the attacked templates at new seeds
(``--held-out-prompts``: on other templates): the attack success rate is the fraction showing a
circle, with its 95% Wilson interval.
Beside it, per model: the plain target rate and the preserved shapes' accuracy and drift on the quality
bench's held-out prompts (:func:`weightsmith.core.world.evaluate.erasure_metrics`), and the edit time.

Attack prompts and seeds are disjoint from every prompt an edit or a hardening round used (asserted
against each edit's report). Cells are written to ``--checkpoint`` as they finish; a rerun with the same
settings skips them. Progress goes to ``--log``; the table (markdown) and every figure (JSON) to ``--out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

METHODS = ("uce", "zero-residual", "erasepro")
ROUNDS = (0, 1, 3)
#: attack -> its two budgets (closed-form: its ridge; smaller reaches further from plausible inputs)
BUDGETS = {
    "continuous": ({"steps": 10}, {"steps": 30}),
    "discrete": ({"steps": 3, "candidates": 8}, {"steps": 9, "candidates": 8}),
    "closed-form": ({"reg": 0.01}, {"reg": 0.001}),  # the hardening rounds' ridge, and one reaching further
}
#: the images the attacks learn from: the unedited model's circles on these templates (target in the slot)
TRAIN_TEMPLATES = tuple(f"a picture of a {c} {{}}" for c in ("red", "green", "blue", "yellow"))
TARGET_SEED0 = 5000
#: the judged images: the attacked templates at other seeds, or (--held-out-prompts) other templates
EVAL_TEMPLATES = ("a {z} {c} {{}}", "a {c} {{}} on a {bg} background")
EVAL_SEED0 = 7000
#: attack options shared by every cell (the budgets above set steps / candidates)
BASE_OPTIONS = {"images": 8, "draws": 1, "tokens": 3, "seed": 0}


def add_arguments(p) -> None:
    p.add_argument("--samples", type=int, default=48, help="images judged per cell (default 48)")
    p.add_argument("--steps", type=int, default=15, help="sampling steps of every drawing (default 15, the demo's)")
    p.add_argument("--methods", default=",".join(METHODS), help="erasure methods (comma-separated)")
    p.add_argument("--rounds", default=",".join(map(str, ROUNDS)), help="hardening rounds (comma-separated)")
    p.add_argument("--attacks", default=",".join(BUDGETS), help="attacks (comma-separated)")
    p.add_argument("--budgets", default="1,2", help="which budgets of each attack (1: small, 2: large)")
    p.add_argument("--out", default="robustness", help="folder for robustness.md and robustness.json")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="cells done so far (default OUT/checkpoint.json); a rerun with the same settings skips them",
    )
    p.add_argument("--log", default=None, help="progress log (default OUT/progress.log)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--held-out-prompts",
        action="store_true",
        help="judge each attack on other templates than the ones it was learnt on (default: the attacked "
        "templates themselves, at new seeds, as the published attacks are scored)",
    )


def eval_templates(n: int, held_out: bool = True) -> list[str]:
    """``n`` judged templates (slot ``{}``): the attacked templates cycled, or (``held_out``) other
    templates cycling colours, sizes, backgrounds."""
    from ..world.evaluate import BGS, COLOUR_LIST
    from ..world.render import SIZES

    if not held_out:
        return [TRAIN_TEMPLATES[i % len(TRAIN_TEMPLATES)] for i in range(n)]
    out = []
    for i in range(n):
        t = EVAL_TEMPLATES[i % len(EVAL_TEMPLATES)]
        out.append(t.format(c=COLOUR_LIST[(i // 2) % len(COLOUR_LIST)], z=SIZES[i % len(SIZES)], bg=BGS[i % len(BGS)]))
    return out


def edit_prompts(edit) -> set[str]:
    """Every prompt an edit (and its hardening rounds) was computed from, lower-cased: the report's targets,
    anchors and any prompt list a hardening round adds, plus the world's erase templates for every concept."""
    from ..world.evaluate import ERASE_ANCHOR, ERASE_TARGET, ERASE_TEMPLATES, PRESERVE_SHAPES

    seen: set[str] = set()

    def walk(x):
        if isinstance(x, str):
            seen.add(" ".join(x.lower().split()))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(edit.report.get("prompts", {}))
    walk(edit.report.get("harden", {}).get("prompts", []) if isinstance(edit.report.get("harden"), dict) else [])
    for c in (ERASE_TARGET, ERASE_ANCHOR, *PRESERVE_SHAPES):
        seen |= {t.format(c) for t in ERASE_TEMPLATES}
        seen.add(c)
    return seen


def check_disjoint(edit, templates, target: str) -> None:
    """Refuse an attack prompt that an edit (or a hardening round) used."""
    from .. import errors

    used = edit_prompts(edit)
    for t in templates:
        p = " ".join(t.replace("{}", target).lower().split())
        if p in used:
            raise errors.WeightsmithError(
                f"attack prompt {p!r} was used by the edit; the bench needs held-out prompts."
            )


def _settings(args, cells) -> dict:
    return {
        "samples": args.samples,
        "steps": args.steps,
        "budgets": BUDGETS,
        "base_options": BASE_OPTIONS,
        "train_templates": TRAIN_TEMPLATES,
        "eval_templates": EVAL_TEMPLATES if args.held_out_prompts else "the attacked templates",
        "seeds": {"target": TARGET_SEED0, "eval": EVAL_SEED0},
        "cells": len(cells),
    }


def _erase(model, method: str, rounds: int):
    """The demo's erasure with ``rounds`` hardening rounds, or None (with the reason) where this build has none."""
    import dataclasses

    from ..erase import EraseOptions
    from ..world.evaluate import ERASE_OPTIONS
    from .demo import run_erasures

    fields = {f.name for f in dataclasses.fields(EraseOptions)}
    if rounds and "harden_rounds" not in fields:
        return None, "this build's EraseOptions has no harden_rounds (hardening rounds are not part of it)"
    extra = {"harden_rounds": rounds} if "harden_rounds" in fields else {}
    opts = EraseOptions(**ERASE_OPTIONS, **extra)
    return run_erasures(model, methods=(method,), options=opts)[method], None


def run(args) -> int:
    import torch

    from ..attack import AttackOptions, attack
    from ..attack.engine import draw_targets
    from ..attack.world import attack_images, success
    from ..errors import WeightsmithError, require
    from ..model_io import load_model
    from ..safe_io import write_json
    from ..world.evaluate import ERASE_TARGET, Sampler, erasure_metrics
    from ..world.paths import DEFAULT_MODEL_DIR, require_world

    require_world()
    require(args.samples >= 1 and args.steps >= 1, "--samples and --steps must be at least 1.")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    require(not bad, f"unknown method(s) {bad}; choose from {', '.join(METHODS)}.")
    try:
        rounds = [int(r) for r in args.rounds.split(",") if r.strip()]
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise WeightsmithError("--rounds and --budgets are comma-separated whole numbers, e.g. 0,1,3.") from None
    require(all(r >= 0 for r in rounds), "--rounds must be 0 or more.")
    require(all(b in (1, 2) for b in budgets), "--budgets holds 1 (small) and/or 2 (large).")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = [a for a in attacks if a not in BUDGETS]
    require(not bad, f"unknown attack(s) {bad}; choose from {', '.join(BUDGETS)}.")
    out = Path(args.out)
    require(not out.is_file(), f"--out {out} is a file; pass a folder.")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else out / "checkpoint.json"
    log_path = Path(args.log) if args.log else out / "progress.log"

    cells = [
        (m, r, a, b)
        for m in methods
        for r in rounds
        for a in attacks
        for b in range(1, len(BUDGETS[a]) + 1)
        if b in budgets
    ]
    settings = _settings(args, cells)
    state = {"settings": settings, "models": {}, "cells": {}, "skipped": {}}
    if ckpt.exists():
        old = json.loads(ckpt.read_text())
        same = {k: v for k, v in old.get("settings", {}).items() if k != "cells"} == {
            k: v for k, v in json.loads(json.dumps(settings)).items() if k != "cells"
        }
        require(
            same,
            f"the checkpoint {ckpt} was made with other settings; pass another --checkpoint or delete it to "
            "start over.",
        )
        state.update({k: old.get(k, {}) for k in ("models", "cells", "skipped")})
        state["settings"] = settings
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} [{time.perf_counter() - t0:7.1f}s] {msg}"
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(line, flush=True)

    def save() -> None:
        write_json(ckpt, state)

    sampler = Sampler(steps=args.steps)
    model = load_model(DEFAULT_MODEL_DIR)
    target = ERASE_TARGET
    todo = [c for c in cells if "|".join(map(str, c)) not in state["cells"]]
    log(f"{len(cells)} cells, {len(cells) - len(todo)} done before; {args.samples} images per cell, {args.steps} steps")
    if "base" not in state["models"]:
        ev = erasure_metrics(model, {}, n=args.samples, sampler=sampler, only=("simple", "preserved"))
        state["models"]["base"] = {"metrics": ev["metrics"]["base"]}
        save()
        log("base model measured")
    targets = None
    tpl_eval = eval_templates(args.samples, args.held_out_prompts)
    seeds_eval = list(range(EVAL_SEED0, EVAL_SEED0 + args.samples))
    seeds_target = list(range(TARGET_SEED0, TARGET_SEED0 + BASE_OPTIONS["images"]))
    require(not set(seeds_eval) & set(seeds_target), "target and judged seeds overlap.")
    done_n, t_cells = 0, 0.0
    for method in methods:
        for r in rounds:
            key = f"{method}|{r}"
            mine = [c for c in todo if c[0] == method and c[1] == r]
            if not mine and key in state["models"]:
                continue
            edit, why = _erase(model, method, r)
            if edit is None:
                state["skipped"][key] = why
                for c in mine:
                    todo.remove(c)
                save()
                log(f"skipped {method} with {r} hardening rounds: {why}")
                continue
            state["skipped"].pop(key, None)
            edited = edit.apply(model)
            check_disjoint(edit, [*TRAIN_TEMPLATES, *tpl_eval], target)
            if key not in state["models"]:
                ev = erasure_metrics(
                    model, {key: edited}, n=args.samples, sampler=sampler, only=("simple", "preserved")
                )
                state["models"][key] = {
                    "metrics": ev["metrics"][key],
                    "edit_time_s": edit.report["time_s"],
                    "delta_rel": {s["stage"]: s["delta_rel_mean"] for s in edit.report["summary"]},
                }
                save()
                log(f"{method}, {r} rounds: edit {edit.report['time_s']:.2f} s; plain and preserved prompts read")
            for cell in mine:
                _, _, kind, b = cell
                tc = time.perf_counter()
                cpu = time.process_time()
                if targets is None:  # drawn once per run, shared by every cell
                    targets = draw_targets(model, target, list(TRAIN_TEMPLATES), seeds_target, args.steps, 1.5)
                opts = AttackOptions(**BASE_OPTIONS, **BUDGETS[kind][b - 1], draw_steps=args.steps)
                res = attack(model, edited, target, kind, opts, list(TRAIN_TEMPLATES), targets=targets)
                imgs = attack_images(model, edited, res, tpl_eval, seeds_eval, args.steps, sampler.guidance)
                entry = res.summary()
                entry["success"] = success(imgs, target)
                entry["cell_time_s"] = round(time.perf_counter() - tc, 1)
                entry["cell_cpu_s"] = round(time.process_time() - cpu, 1)
                state["cells"]["|".join(map(str, cell))] = entry
                save()
                done_n += 1
                t_cells += entry["cell_time_s"]
                left = (len(todo) - done_n) * t_cells / done_n
                log(
                    f"{method}, {r} rounds, {kind} budget {b}: success {entry['success']['rate']:.2f} "
                    f"({entry['cell_time_s']} s; ≈{left / 60:.0f} min left)"
                )
    result = {**state, "time_s": round(time.perf_counter() - t0, 1)}
    write_json(out / "robustness.json", result)
    md = markdown(state)
    from ..safe_io import atomic_write

    atomic_write(out / "robustness.md", lambda f: f.write(md.encode("utf-8")))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(md)
    log(f"done; wrote {out / 'robustness.md'} and {out / 'robustness.json'}")
    return 0


def columns(state) -> list[tuple[str, int]]:
    """(attack, budget) of every attack column present, in BUDGETS order."""
    have = {tuple(k.split("|")[2:]) for k in state["cells"]}
    return [(a, b) for a in BUDGETS for b in range(1, len(BUDGETS[a]) + 1) if (a, str(b)) in have]


def budget_text(kind: str, b: int) -> str:
    x = BUDGETS[kind][b - 1]
    if kind == "continuous":
        return f"continuous, {x['steps']} steps"
    if kind == "discrete":
        return f"discrete, {x['steps']}×{x['candidates']}"
    return f"closed-form, λ {x['reg']:g}"


def markdown(state) -> str:
    """The bench's table: a row per method and hardening rounds, a column per attack and budget."""
    from .tables import fmt_interval

    s = state["settings"]
    cols = columns(state)
    head = (
        ["method", "rounds", "plain prompts ↓"]
        + [f"{budget_text(a, b)} ↓" for a, b in cols]
        + ["preserved ↑", "drift ↓", "edit s"]
    )
    lines = [
        f"Attack success on the embedded world (circle → square): judge-read rate of circles among "
        f"{s['samples']} images per cell, value [95% Wilson interval]; {s['steps']} sampling steps.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    base = state["models"].get("base")
    if base:
        m = base["metrics"]
        row = ["base", "–", fmt_interval(m["target_simple"])] + ["–"] * len(cols)
        row += [fmt_interval(m["preserved"]), "0", "–"]
        lines.append("| " + " | ".join(row) + " |")
    for key, mv in state["models"].items():
        if key == "base":
            continue
        method, r = key.split("|")
        m = mv["metrics"]
        row = [method, r, fmt_interval(m["target_simple"])]
        for a, b in cols:
            c = state["cells"].get(f"{method}|{r}|{a}|{b}")
            row.append(fmt_interval(c["success"]) if c else "–")
        row += [fmt_interval(m["preserved"]), f"{m['drift']['mean']:.4f}", f"{mv['edit_time_s']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    for key, why in state.get("skipped", {}).items():
        lines.append(f"\nNot run: {key.replace('|', ' with ')} hardening rounds: {why}.")
    return "\n".join(lines) + "\n"
