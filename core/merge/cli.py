"""``weightsmith merge``: merge LoRAs with IterIS or a baseline and write a LoRA or a checkpoint."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..errors import WeightsmithError
from ..memory import WEIGHT_PRECISIONS
from ..optspec import spec
from .options import METHODS, QUICK, MergeOptions, with_quick

EPILOG = """examples:
  weightsmith merge --model sd15.safetensors --lora a.safetensors --lora b.safetensors:0.8 --out ab.safetensors
  weightsmith merge --model sd15.safetensors --lora a.safetensors --lora b.safetensors \\
      --prompts a.safetensors "a photo of zq; zq on a table" --prompts b.safetensors "zx style city" \\
      --iterations 10 --samples 16 --rank 32 --out ab.safetensors --report ab.json
  weightsmith merge --model sd15.safetensors --lora a.safetensors --lora b.safetensors --method ties \\
      --format checkpoint --out merged-model.safetensors
  weightsmith merge --model sd15.safetensors --lora a.safetensors:1:OUTALL \\
      --lora "b.safetensors:0.8:1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0" --method linear --out ab.safetensors
Prompts are split at ';' (commas stay in a prompt; docs/method.md, "Lists in text fields").
Without --prompts, each LoRA's training tags (ss_tag_frequency) are used."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge LoRAs (IterIS, linear, concat, svd, ties, dare, regmean)",
        description="Merge LoRAs into one LoRA (or a merged checkpoint). IterIS solves, for every module, "
        "a closed-form least-squares problem on features of sampled generations, iterated to "
        "convergence; the baselines work on the weights alone.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="base model: single-file .safetensors or diffusers folder (Flux: the transformer file, an all-in-one "
        "checkpoint or a diffusers folder; linear, concat, svd, ties and dare)",
    )
    from ..flux_io import add_text_encoder_argument

    add_text_encoder_argument(p)
    p.add_argument(
        "--lora",
        action="append",
        required=True,
        metavar="FILE[:WEIGHT[:BLOCKS]]",
        help="a LoRA to merge (repeat); optional weight after ':' (default 1), then optional block "
        "weights after another ':' (SuperMerger's NAME:RATIO:BLOCKS; a preset such as OUTALL or "
        "comma-separated numbers, docs/merge.md 'Block weights'); FILE:BLOCKS means weight 1",
    )
    p.add_argument(
        "--block-presets",
        default=None,
        metavar="FILE",
        help="extra block-weight presets, LoRA Block Weight's lbwpresets.txt format (NAME:v1,v2,... per line)",
    )
    p.add_argument(
        "--prompts",
        action="append",
        nargs="+",
        metavar="ARG",
        help="'p1; p2' for every LoRA, or LORA_FILE 'p1; p2' for one LoRA (repeatable)",
    )
    p.add_argument("--method", choices=METHODS, default="iteris")
    d = MergeOptions()
    q = QUICK
    p.add_argument(
        "--speed",
        choices=("auto", "quick", "thorough"),
        default="auto",
        help="IterIS: quick = the settings below that are not given take their quick values "
        f"({', '.join(f'{k} {v}' for k, v in q.items())}; minutes instead of hours for a full-size "
        "model on a CPU, docs/merge.md 'Speed'); thorough = their declared defaults; auto (default) "
        "= quick on a CPU, thorough on a GPU",
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"IterIS iterations (default {d.iterations}; quick {q['iterations']})",
    )
    p.add_argument("--tol", type=float, default=d.tol, help="stop when the relative change falls below this")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"(prompt, seed) samples per LoRA (default {d.samples}; quick {q['samples']})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"DDIM steps per sample trajectory (default {d.steps}; quick {q['steps']})",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"image side of the samples in pixels (default: the model's native size; quick {q['resolution']})",
    )
    p.add_argument(
        "--latent-size",
        type=int,
        default=None,
        help="latent side length for sampling, overrides --resolution (e.g. 32 = 256 px on SD1.5)",
    )
    p.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help=spec(MergeOptions, "max_rows").cli_help + f" (default all; quick {q['max_rows']})",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--alpha", type=float, default=d.alpha1, help=f"ridge α₁ = α₂ (default {d.alpha1:g})")
    p.add_argument(
        "--reg-coef",
        "--reg-ceof",
        dest="reg_coef",
        type=float,
        default=d.reg_coef,
        help=spec(MergeOptions, "reg_coef").cli_help + " (--reg-ceof: the reference code's spelling)",
    )
    p.add_argument(
        "--untouched",
        choices=spec(MergeOptions, "untouched").choices,
        default=d.untouched,
        help=spec(MergeOptions, "untouched").cli_help,
    )
    p.add_argument(
        "--schedule",
        choices=spec(MergeOptions, "schedule").choices,
        default=d.schedule,
        help=spec(MergeOptions, "schedule").cli_help,
    )
    p.add_argument(
        "--ridge-toward",
        choices=spec(MergeOptions, "ridge_toward").choices,
        default=d.ridge_toward,
        help=spec(MergeOptions, "ridge_toward").cli_help,
    )
    p.add_argument("--seed", type=int, default=d.seed, help=spec(MergeOptions, "seed").cli_help)
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="compress the written LoRA to this rank (truncated SVD; error reported). svd method: its merge rank",
    )
    p.add_argument("--density", type=float, default=d.ties_density, help="TIES keep fraction")
    p.add_argument("--drop", type=float, default=d.dare_p, help="DARE drop probability")
    p.add_argument("--format", choices=("lora", "diff", "checkpoint"), default="lora")
    p.add_argument("--out", required=True, help="output file (.safetensors; a folder for diffusers checkpoints)")
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument(
        "--max-gram-dim",
        type=int,
        default=None,
        help=f"modules with wider inputs use the weighted sum (default {d.max_gram_dim}; quick "
        f"{q['max_gram_dim']}; lower it to save memory and time)",
    )
    p.add_argument(
        "--max-memory",
        type=float,
        default=d.max_memory_gb,
        metavar="GB",
        help=spec(MergeOptions, "max_memory_gb").cli_help,
    )
    p.add_argument(
        "--stats-on-cpu", action="store_true", help="keep IterIS' float64 statistics in CPU memory (saves GPU memory)"
    )
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for single-file checkpoints")
    p.add_argument(
        "--weights-precision",
        choices=WEIGHT_PRECISIONS,
        default="float32",
        help="hold the UNet's weights in this precision, computed in float32 (bfloat16: half the "
        "memory, e.g. SDXL's UNet 5.1 instead of 10.3 GB; float16 is lossless for fp16 files)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def options_from_args(args) -> tuple[MergeOptions, bool]:
    """The merge's options from the command line, and whether the quick settings filled the flags not
    given (``--speed``; auto: on a CPU, docs/merge.md "Speed")."""
    from ..optspec import from_values

    values = dict(
        iterations=args.iterations,
        tol=args.tol,
        samples=args.samples,
        steps=args.steps,
        resolution=args.resolution,
        latent_size=args.latent_size,
        max_rows=args.max_rows,
        batch_size=args.batch_size,
        alpha1=args.alpha,
        alpha2=args.alpha,
        reg_coef=args.reg_coef,
        untouched=args.untouched,
        ridge_toward=args.ridge_toward,
        schedule=args.schedule,
        seed=args.seed,
        svd_rank=args.rank,
        ties_density=args.density,
        dare_p=args.drop,
        gram_device="cpu" if args.stats_on_cpu else None,
        max_gram_dim=args.max_gram_dim,
        max_memory_gb=args.max_memory,
    )
    quick = args.speed == "quick" or (args.speed == "auto" and _device(args.device) == "cpu")
    return from_values(MergeOptions, with_quick(values, quick), where="weightsmith merge"), quick


def parse_lora_spec(arg: str, presets: dict | None = None) -> tuple[str, float, str | None]:
    """``FILE[:WEIGHT[:BLOCKS]]`` or ``FILE:BLOCKS`` -> (file, weight, block-weight string or None). The
    block weights are recognised as a preset name or comma-separated numbers after the last ':' (a
    drive letter like ``C:`` is neither); docs/merge.md, "Block weights"."""
    from ..blockweights import is_spec

    head, sep, tail = arg.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")) and is_spec(tail, presets) and not Path(arg).exists():
        path, w = parse_lora_arg(head)
        return path, w, tail.strip()
    path, w = parse_lora_arg(arg)
    return path, w, None


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` (a drive letter like ``C:`` is not a weight)."""
    head, sep, tail = arg.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            w = float(tail)
        except ValueError:
            if not Path(arg).exists() and Path(head).exists():
                raise WeightsmithError(
                    f"--lora {arg}: the weight {tail!r} after ':' is not a number; write "
                    f"{head}:0.8, or {head} for weight 1."
                ) from None
            return arg, 1.0
        if not math.isfinite(w):
            raise WeightsmithError(f"weight of {head} is not a finite number: {tail!r}")
        return head, w
    return arg, 1.0


def _split_prompts(s: str) -> list[str]:
    """One --prompts value: core.prompt_lists' rule (';' and line breaks separate, commas stay)."""
    from ..prompt_lists import split_items

    return split_items(s)


def _prompt_map(groups, lora_paths):
    """--prompts groups -> per-LoRA lists (None = default)."""
    per = [None] * len(lora_paths)
    for g in groups or []:
        if len(g) == 1:
            if any(Path(lp) == Path(g[0]) or Path(lp).name == g[0] for lp in lora_paths) or (
                g[0].lower().endswith((".safetensors", ".pt", ".ckpt")) and Path(g[0]).exists()
            ):
                raise WeightsmithError(
                    f"--prompts {g[0]} names a LoRA file but gives no prompts; write "
                    f"--prompts {g[0]} 'p1; p2' (or --prompts 'p1; p2' for every LoRA)."
                )
            per = [(p or []) + _split_prompts(g[0]) for p in per]
        elif len(g) == 2:
            key = Path(g[0])
            idx = [
                i
                for i, lp in enumerate(lora_paths)
                if Path(lp) == key or Path(lp).name == key.name or Path(lp).stem == g[0]
            ]
            if not idx:
                raise WeightsmithError(f"--prompts names {g[0]}, which is not one of the --lora files.")
            for i in idx:
                per[i] = (per[i] or []) + _split_prompts(g[1])
        else:
            raise WeightsmithError("--prompts takes 'p1; p2' or LORA_FILE 'p1; p2'.")
    return per


def _device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise WeightsmithError("--device cuda: no CUDA device is available; use --device cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise WeightsmithError("--device mps: MPS is not available; use --device cpu.")
    return name


def _json_safe(x):
    from ..safe_io import json_safe

    return json_safe(x)


def run(args) -> int:
    from ..lora_read import load_lora
    from ..model_io import load_model
    from ..progress import tqdm_progress
    from . import merge, save_merge

    if not args.lora:
        raise WeightsmithError("no LoRAs to merge; pass at least one --lora FILE.")
    presets = read_block_presets(args.block_presets)
    specs = [parse_lora_spec(a, presets) for a in args.lora]
    pairs = [(p, w) for p, w, _ in specs]
    blocks = [b for _, _, b in specs] if any(b for _, _, b in specs) else None
    out = check_outputs(args, pairs)
    prompts = _prompt_map(args.prompts, [p for p, _ in pairs])
    opts, quick = options_from_args(args)  # validated, before loading anything
    from ..flux_io import is_flux, require_flux_format
    from .api import require_flux_method

    flux = bool(args.text_encoder) or is_flux(args.model)
    if flux:  # before the model is read
        require_flux_method(args.method)
        require_flux_format(args.format, "merged")
    if quick and args.method in ("iteris", "regmean"):
        label = "IterIS" if args.method == "iteris" else "RegMean"
        print(
            f"weightsmith: {label} with the quick settings for what is not given ("
            + ", ".join(f"{k} {getattr(opts, k)}" for k in QUICK)
            + "; --speed thorough for the declared "
            "defaults, docs/merge.md 'Speed')",
            file=sys.stderr,
        )
    model = load_model(
        args.model, tokenizer=args.tokenizer, weights_dtype=args.weights_precision, text_encoders=args.text_encoder
    )
    loras = [load_lora(p, model) for p, _ in pairs]
    if flux:
        from .api import check_flux_parts

        # before the merge: the text encoders the output needs
        check_flux_parts(model, {f"LoRA {l.name}": l.modules for l in loras}, args.format)
    from ..safe_io import same_path

    for i, (p, _) in enumerate(pairs):
        if any(same_path(p, q) for q, _ in pairs[:i]):
            print(
                f"weightsmith: warning: {p} is given more than once; each copy counts as a LoRA of its own "
                "(its effect adds up). Give a weight instead (FILE:2) if that is what you mean.",
                file=sys.stderr,
            )
    for l in loras:
        for n in l.notes:
            print(f"weightsmith: note: {l.name}: {n}", file=sys.stderr)
        if l.unmatched:
            print(
                f"weightsmith: note: {l.name}: {len(l.unmatched)} keys name no module of this model and are "
                f"ignored (e.g. {l.unmatched[0]})",
                file=sys.stderr,
            )
    dev = _device(args.device)
    if dev != "cpu" and args.method in ("iteris", "regmean"):
        for te in model.text_encoders.values():
            te.to(dev)
        model.unet.to(dev)
    progress = None if args.no_progress else tqdm_progress(f"merge ({args.method})")
    try:
        edit = merge(
            model,
            loras,
            args.method,
            weights=[w for _, w in pairs],
            prompts=prompts,
            options=opts,
            progress=progress,
            cancel=None,
            blocks=blocks,
            block_presets=presets,
        )
    finally:
        if progress is not None:
            progress.close()
    if dev != "cpu" and args.method in ("iteris", "regmean"):  # only what was moved above goes back
        for te in model.text_encoders.values():
            te.to("cpu")
        model.unet.to("cpu")
    fmt_rank = args.rank if args.method != "svd" else None
    written = save_merge(edit, model, out, fmt=args.format, rank=fmt_rank, loras=loras)
    rep = dict(edit.report)
    rep["output"] = {k: v for k, v in written.items() if k != "errors"}
    if written.get("errors"):
        rep["output"]["export_errors"] = written["errors"]
    if args.report:
        from ..safe_io import write_report_after

        write_report_after(rep, Path(args.report), out)
    curve = rep.get("curve") or []
    last = next((c for c in reversed(curve) if c.get("objective") is not None), None)
    msg = f"wrote {out} ({args.method}, {len(loras)} LoRAs, {rep['time_s']:.1f}s"
    if args.method == "iteris":
        msg += f", {rep.get('iterations', 0)} iterations"
        if last:
            msg += f", objective {last['objective']:.4g}"
    if written.get("rank") is not None:
        msg += f", rank {written['rank']}, export error {written.get('max_error', 0):.2e}"
    print(msg + ")")
    for f in written.get("files", [])[1:] + ([written["t5_file"]] if written.get("t5_file") else []):
        print(f"wrote {f}")
    if written.get("note"):
        print(f"note: {written['note']}")
    from ..report import block_lines

    for line in block_lines(rep):
        print(line)
    return 0


def read_block_presets(path) -> dict | None:
    """--block-presets FILE: LoRA Block Weight's lbwpresets.txt format (core/blockweights.py)."""
    if not path:
        return None
    from ..blockweights import parse_presets

    p = Path(path)
    if not p.is_file():
        raise WeightsmithError(
            f"--block-presets {path} is not a file; pass a text file of NAME:v1,v2,... lines "
            "(LoRA Block Weight's lbwpresets.txt)."
        )
    return parse_presets(p.read_text(encoding="utf-8", errors="replace"))


def check_outputs(args, pairs) -> Path:
    """--out and --report are new paths: neither is an input (model, LoRA, tokenizer), inside an
    input folder, or the other; their folders are writable (checked before any work)."""
    from ..safe_io import check_paths, check_writable_file

    out = Path(args.out)
    report = Path(args.report) if args.report else None
    inputs = {"the input model (--model)": args.model}
    for p, _ in pairs:
        inputs.setdefault(f"the input LoRA {p}", p)
    for f in getattr(args, "text_encoder", None) or ():
        inputs.setdefault(f"the --text-encoder file {f}", f)
    if args.tokenizer:
        inputs["the --tokenizer folder"] = args.tokenizer
    check_paths({"--out": out, "--report": report}, inputs)
    model = Path(args.model)
    if args.format == "checkpoint" and model.is_dir():
        if out.suffix.lower() == ".safetensors":
            raise WeightsmithError(
                f"--model is a diffusers folder, so the merged model is written as a folder "
                f"too; --out {out} is a file name. Pass a new folder name (e.g. "
                f"{out.with_suffix('')}), or --format lora."
            )
        if out.exists():
            raise WeightsmithError(f"--out {out} already exists; choose a new folder name for the merged model.")
    elif out.suffix.lower() != ".safetensors":
        raise WeightsmithError(
            f"--out must end in .safetensors for a LoRA, not {out.name!r}."
            if args.format != "checkpoint"
            else f"--out must end in .safetensors for a checkpoint, not {out.name!r}."
        )
    check_writable_file(out, "--out")
    if report is not None:
        check_writable_file(report, "--report", stream_ok=True)
    if args.tokenizer and not Path(args.tokenizer).exists():
        raise WeightsmithError(
            f"--tokenizer {args.tokenizer} does not exist; pass a CLIP tokenizer folder "
            "(vocab.json + merges.txt) or leave it out."
        )
    return out
