"""``weightsmith demo``: the main job on the embedded default world, with pictures.

1. Erase ``circle`` → ``square`` (preserving triangle, cross, diamond) from the shipped tiny
   text-to-image model with ``uce``, ``zero-residual`` and ``erasepro``.
2. Merge the two shipped LoRAs (subject: ``zq`` → star; style: ``zx style`` → stripes) with
   ``linear`` and ``iteris``.
3. Write ``report.html`` (image grids: rows = prompts, simple and complex; columns = base and each
   method; plus the judge's metrics), ``report.json`` and the PNGs into ``--out``.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

ERASE_METHODS = ("uce", "zero-residual", "erasepro")
MERGE_METHODS = ("linear", "iteris")
# prompts the edit is computed from (the evaluation uses other, held-out combinations)
ERASE_TEMPLATES = ("a red {}", "a small blue {} on the left", "a large {} on a white background",
                   "a green {} on the top and a yellow triangle on the bottom")


def register(sub) -> None:
    p = sub.add_parser("demo", help="erase a concept and merge two LoRAs on the embedded tiny model, "
                                    "with an HTML report")
    p.add_argument("--out", default="weightsmith-demo", help="report folder (default: ./weightsmith-demo)")
    p.add_argument("--samples", type=int, default=14, help="images per prompt set and method")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--no-merge", action="store_true", help="skip the LoRA-merging half")
    p.set_defaults(func=run)


def run_erasures(model, progress=None):
    from ..erase import EraseOptions, erase
    from .evaluate import ERASE_ANCHOR, ERASE_TARGET, PRESERVE_SHAPES

    edits = {}
    for m in ERASE_METHODS:
        edits[m] = erase(model, [ERASE_TARGET], [ERASE_ANCHOR], preserve=list(PRESERVE_SHAPES), method=m,
                         options=EraseOptions(expand_prompts=False, extra_templates=ERASE_TEMPLATES))
        if progress:
            progress(f"erase {m}: {edits[m].report['time_s']:.2f} s")
    return edits


def run_merges(model, progress=None, iterations: int = 4, samples: int = 4):
    from ..lora_read import load_lora
    from ..merge import MergeOptions, merge
    from .evaluate import merge_sample_prompts
    from .paths import LORA_STYLE, LORA_SUBJECT

    loras = [load_lora(LORA_SUBJECT, model), load_lora(LORA_STYLE, model)]
    edits = {}
    for m in MERGE_METHODS:
        opts = MergeOptions(iterations=iterations, samples=samples, steps=3)
        edits[m] = merge(model, loras, method=m, options=opts, prompts=merge_sample_prompts(samples))
        if progress:
            progress(f"merge {m}: {edits[m].report.get('time_s', 0):.2f} s")
    return loras, edits


def run(args) -> int:
    import torch

    from ..errors import WeightsmithError
    from ..model_io import load_model
    from .evaluate import Sampler, erasure_metrics, merge_metrics, with_lora
    from .grid import save_grid
    from .paths import DEFAULT_MODEL_DIR, JUDGE_PATH

    t0 = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise WeightsmithError(f"--out {out} is a file; pass a folder for the report.")
    out.mkdir(parents=True, exist_ok=True)
    if not DEFAULT_MODEL_DIR.exists() or not JUDGE_PATH.exists():
        return run_without_world(out, t0)
    torch.manual_seed(0)
    say = lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", flush=True)  # noqa: E731
    model = load_model(DEFAULT_MODEL_DIR)
    say(f"loaded the embedded model ({model.family}, {DEFAULT_MODEL_DIR.name})")
    sampler = Sampler(steps=args.steps)
    report: dict = {"model": str(DEFAULT_MODEL_DIR), "sampler": {"steps": args.steps, "guidance": sampler.guidance}}

    edits = run_erasures(model, say)
    edited = {m: e.apply(model) for m, e in edits.items()}
    ev = erasure_metrics(model, edited, n=args.samples, sampler=sampler, keep_images=True)
    say("erasure evaluated")
    imgs = ev.pop("images")
    rows = min(4, args.samples)
    from .evaluate import erase_prompt_sets

    simple, complex_, preserved = erase_prompt_sets(args.samples)
    labels = simple[:rows] + complex_[:rows] + [p for p, _, _ in preserved][:rows]
    cols = {k: torch.cat([v[0][:rows], v[1][:rows], v[2][:rows]]) for k, v in imgs.items()}
    save_grid(cols, labels, out / "erase_grid.png", title="erase 'circle' -> 'square'")
    report["erase"] = {**ev, "stages": {m: e.report["summary"] for m, e in edits.items()},
                       "time_s": {m: e.report["time_s"] for m, e in edits.items()}}

    if not args.no_merge:
        try:
            import weightsmith.core.merge  # noqa: F401
        except ModuleNotFoundError:
            say("merging is not part of this build; skipped")
        else:
            loras, medits = run_merges(model, say)
            models = {"subject LoRA": with_lora(model, loras[0]), "style LoRA": with_lora(model, loras[1])}
            models.update({m: e.apply(model) for m, e in medits.items()})
            mv = merge_metrics(model, models, n=args.samples, sampler=sampler, keep_images=True)
            say("merging evaluated")
            mimgs = mv.pop("images")
            from .evaluate import merge_prompt_sets

            subj, style, both, neither = merge_prompt_sets(args.samples)
            labels = subj[:rows] + style[:rows] + both[:rows] + neither[:rows]
            cols = {k: torch.cat([x[:rows] for x in v]) for k, v in mimgs.items()}
            save_grid(cols, labels, out / "merge_grid.png", title="merge subject + style LoRAs")
            report["merge"] = {**mv, "time_s": {m: e.report.get("time_s") for m, e in medits.items()},
                               "iterations": {m: e.report.get("iterations") for m, e in medits.items()}}
    report["time_s"] = round(time.perf_counter() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(render_html(report))
    say(f"done in {report['time_s']} s")
    print(f"report: {(out / 'report.html').resolve()}")
    _print_tables(report)
    return 0


def run_without_world(out: Path, t0: float) -> int:
    """Fallback when the embedded world's files are missing: the erase half on a seeded random
    model built in-process, clearly labelled, with numbers but no pictures."""
    from ..erase.cli import print_summary
    from ..random_models import build_random_model

    print("NOTE: the embedded default world (core/world/assets) is missing; running the erasure half on a "
          "RANDOM-WEIGHT tiny SD1-architecture model built in-process. No pictures or quality numbers.")
    from ..erase import erase

    model = build_random_model("sd1", "tiny", seed=0)
    report = {"model": "random-weight tiny SD1 architecture (in-process, seed 0)", "erase": {}}
    for m in ERASE_METHODS:
        edit = erase(model, ["van gogh"], ["art"], method=m)
        print_summary(edit.report, out / "report.json")
        report["erase"][m] = {"time_s": edit.report["time_s"], "summary": edit.report["summary"]}
    report["time_s"] = round(time.perf_counter() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {(out / 'report.json').resolve()}")
    return 0


def _table(metrics: dict, cols: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = ""
    for name, m in metrics.items():
        body += f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{m[k]:.2f}</td>" for k, _ in cols) + "</tr>"
    return f"<table><tr><th>model</th>{head}</tr>{body}</table>"


ERASE_COLS = [("target_simple", "target found, simple ↓"), ("target_complex", "target found, complex ↓"),
              ("anchor", "anchor found ↑"), ("preserved", "other shapes correct ↑"), ("drift", "drift ↓")]
MERGE_COLS = [("subject", "star with zq ↑"), ("style", "stripes with zx style ↑"),
              ("both", "striped star, both triggers ↑"), ("drift", "drift, no trigger ↓")]


def render_html(report: dict) -> str:
    parts = ["<!doctype html><meta charset=utf-8><title>Weightsmith demo</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>",
             "<h1>Weightsmith demo on the embedded tiny world</h1>",
             f"<p>Model: <code>{html.escape(report['model'])}</code>. Every number is read off generated images by "
             f"the shipped judge; {report['erase']['n_per_set']} images per prompt set and model, "
             f"{report['sampler']['steps']} DDIM steps, guidance {report['sampler']['guidance']}.</p>",
             "<h2>Erasure: circle → square</h2>", _table(report["erase"]["metrics"], ERASE_COLS),
             "<p>Edit time (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report["erase"]["time_s"].items()) + "</p>",
             "<img src='erase_grid.png' alt='erasure grid'>"]
    if "merge" in report:
        parts += ["<h2>Merging: subject LoRA (zq → star) + style LoRA (zx style → stripes)</h2>",
                  _table(report["merge"]["metrics"], MERGE_COLS), "<img src='merge_grid.png' alt='merge grid'>"]
    parts.append(f"<p>Total time {report['time_s']} s.</p>")
    return "\n".join(parts)


def _print_tables(report: dict) -> None:
    def show(title, metrics, cols):
        print(title)
        print(f"  {'model':<16}" + "".join(f"{k:>16}" for k, _ in cols))
        for name, m in metrics.items():
            print(f"  {name:<16}" + "".join(f"{m[k]:>16.2f}" for k, _ in cols))

    show("erasure (circle -> square):", report["erase"]["metrics"], ERASE_COLS)
    if "merge" in report:
        show("merging (subject + style):", report["merge"]["metrics"], MERGE_COLS)
