"""``weightsmith attack``: white-box attacks on an edited model and the unedited one (docs/robustness.md).

The edited model is an erased checkpoint (``--edited``) or the unedited model plus an edit file
(``--edit``: a LoRA or .diff LoRA, such as ``weightsmith erase --format lora`` writes). ``--model
world`` is the embedded world's model; there the judge reads each attack's images and the report
gives its success rate with a 95% interval.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import require
from ..optspec import from_values, spec
from .options import ATTACK_HELP, ATTACKS, AttackOptions

_FIELDS = ("tokens", "steps", "candidates", "lr", "images", "draws", "draw_steps", "guidance", "reg", "loss", "seed")
#: first seed of the images the judge reads (the target images start at 50 000)
EVAL_SEED0 = 90_000


def register(sub) -> None:
    p = sub.add_parser(
        "attack",
        help="white-box attacks on an edited model: does an erased concept come back? (continuous, discrete, "
        "closed-form)",
        description="Attack an edited model (an erased checkpoint, or a model plus an edit file) to bring an erased "
        "concept back, beside the unedited model. " + ATTACK_HELP,
        epilog='example: weightsmith attack --model world --edit no_circle.safetensors --target circle --prompt "a '
        'picture of a red {}" --out attack-report',
    )
    p.add_argument("--model", required=True, help="the unedited model (.safetensors, diffusers folder, or 'world')")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--edited", help="the edited model (a checkpoint of the same architecture)")
    g.add_argument("--edit", help="an edit of --model as a LoRA or .diff LoRA file")
    p.add_argument("--target", required=True, help="the erased concept the attacks try to bring back")
    p.add_argument(
        "--attack",
        action="append",
        choices=(*ATTACKS, "all"),
        default=None,
        help="attack to run (repeatable; default all)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEMPLATE",
        help='prompt with {} where the adversarial tokens go (repeatable; default "{}")',
    )
    p.add_argument(
        "--samples", type=int, default=16, help="embedded world only: images the judge reads per attack (default 16)"
    )
    p.add_argument("--out", default=None, help="folder for report.json, the learnt embeddings and image grids")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--clip-skip", type=int, default=None, help="CLIP layer the UNet reads (SD1/SD2)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for single-file checkpoints")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.add_argument_group("budget and seeds")
    for name in _FIELDS:
        s = spec(AttackOptions, name)
        kw = {"choices": s.choices} if s.choices else {"type": {"int": int, "float": float}.get(s.kind, str)}
        a.add_argument(s.flag, dest=name, default=s.default, help=s.cli_help, **kw)
    p.set_defaults(func=run)


def _load(args):
    from ..edit import Edit
    from ..lora_read import load_lora
    from ..model_io import load_model
    from ..safe_io import check_input
    from ..world.paths import DEFAULT_MODEL_DIR, require_world
    from .engine import check_family

    world = args.model == "world"
    if world:
        require_world()
    path = DEFAULT_MODEL_DIR if world else check_input(args.model, "--model", folder_ok=True)
    base = load_model(path, clip_skip=args.clip_skip, tokenizer=args.tokenizer)
    check_family(base)
    if args.edit:
        lora = load_lora(check_input(args.edit, "--edit"), base)
        edited = Edit(base.family, dict(base.unet_config), lora.deltas()).apply(base)
    else:
        edited = load_model(
            check_input(args.edited, "--edited", folder_ok=True), clip_skip=args.clip_skip, tokenizer=args.tokenizer
        )
    return base, edited, world


def run(args) -> int:
    from ..progress import tqdm_progress
    from ..safe_io import write_json
    from .attacks import attack
    from .engine import check_pair, guidance_for
    from .world import attack_images, success, world_shape

    opts = from_values(AttackOptions, {k: getattr(args, k) for k in _FIELDS}, where="weightsmith attack")
    opts.validate()
    kinds = list(ATTACKS) if not args.attack or "all" in args.attack else list(dict.fromkeys(args.attack))
    templates = args.prompt or ["{}"]
    require(args.samples >= 1, "--samples must be at least 1.")
    out = Path(args.out) if args.out else None
    if out is not None:
        require(not out.is_file(), f"--out {out} is a file; pass a folder for the report.")
    base, edited, world = _load(args)
    check_pair(base, edited)
    judged = world and world_shape(args.target) is not None
    g = guidance_for(base, opts.guidance)
    t0 = time.perf_counter()
    report = {"model": args.model, "edited": args.edited or args.edit, "target": args.target, "attacks": {}}
    targets, grids = None, {}
    for kind in kinds:
        bar = None if args.quiet else tqdm_progress(f"attack ({kind})")
        try:
            res = attack(base, edited, args.target, kind, opts, templates, targets=targets, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        entry = res.summary()
        if judged:
            seeds = range(EVAL_SEED0, EVAL_SEED0 + args.samples)
            imgs = attack_images(base, edited, res, templates, seeds, opts.draw_steps, g)
            entry["success"] = success(imgs, args.target)
            grids[kind] = imgs
        report["attacks"][kind] = entry
        if out is not None and res.embeddings:
            from ..safe_io import atomic_save_file

            out.mkdir(parents=True, exist_ok=True)
            atomic_save_file(res.tensors(), out / f"{kind}_embeddings.safetensors", {"words": " ".join(res.words)})
    if judged:
        from .world import plain_images

        seeds = list(range(EVAL_SEED0, EVAL_SEED0 + args.samples))
        plain = [templates[i % len(templates)].replace("{}", args.target) for i in range(len(seeds))]
        for name, m in (("unedited", base), ("edited", edited)):
            imgs = plain_images(m, plain, seeds, opts.draw_steps, g)
            report[f"plain_{name}"] = success(imgs, args.target)
            grids[f"plain, {name}"] = imgs
    report["time_s"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "report.json", report)
        if grids:
            from ..world.grid import save_grid

            rows = min(8, args.samples)
            labels = [templates[i % len(templates)] for i in range(rows)]
            save_grid({k: v[:rows] for k, v in grids.items()}, labels, out / "attack_grid.png", title=args.target)
    if args.json:
        import json

        print(json.dumps(report, indent=2))
        return 0
    print_report(report, file=sys.stdout)
    if out is not None:
        print(f"wrote {out / 'report.json'}")
    return 0


def fmt_interval(m: dict) -> str:
    lo, hi = m["ci"]
    return f"{m['rate']:.2f} [{lo:.2f}, {hi:.2f}] (n = {m['n']})"


def print_report(report: dict, file=sys.stdout) -> None:
    print(f"attacks on {report['edited']} (unedited: {report['model']}), target {report['target']!r}", file=file)
    print(f"{'attack':<13}{'loss base':>11}{'plain':>9}{'start':>9}{'final':>9}{'time':>8}  found", file=file)
    for kind, e in report["attacks"].items():
        found = {
            "discrete": repr(e["prompt"]),
            "continuous": f"{len(e['words'] or [])} embeddings (started from {' '.join(e['words'] or [])!r})",
        }.get(kind, "conditioning of the target prompt")
        print(
            f"{kind:<13}{e['loss_base']:>11.4f}{e['loss_plain']:>9.4f}{e['loss_start']:>9.4f}{e['loss_final']:>9.4f}"
            f"{e['time_s']:>7.1f}s  {found}" + (f"  · success {fmt_interval(e['success'])}" if "success" in e else ""),
            file=file,
        )
    for name in ("unedited", "edited"):
        if f"plain_{name}" in report:
            print(f"plain prompts, {name}: target drawn {fmt_interval(report[f'plain_{name}'])}", file=file)
