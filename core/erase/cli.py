"""``weightsmith erase``: erase concepts from a model and write a checkpoint, LoRA or .diff file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import WeightsmithError, require
from ..optspec import from_values, parse_layer_range, spec
from .options import METHOD_HELP, METHODS, TE_SUBLAYERS, EraseOptions

FORMATS = ("checkpoint", "lora", "diff")


def _layer_range(text: str):
    try:
        return parse_layer_range(text)
    except WeightsmithError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sublayers(text: str):
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in TE_SUBLAYERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown sub-layer(s) {bad}; choose from {','.join(TE_SUBLAYERS)}")
    return items


def register(sub) -> None:
    O = {
        k: spec(EraseOptions, k)
        for k in (
            "tokens",
            "te_sublayers",
            "te_layers",
            "lam",
            "eta_preserve",
            "rcond",
            "cond_limit",
            "harden_rounds",
            "harden_reg",
        )
    }
    p = sub.add_parser(
        "erase",
        help="erase concepts from a model (ErasePro, zero-residual, UCE)",
        description="Erase target concepts by mapping them onto anchor concepts in closed form.",
        epilog='example: weightsmith erase --model sd15.safetensors --target "Van Gogh" --anchor art '
        "--format lora --out no_vangogh.safetensors --report report.json",
    )
    p.add_argument(
        "--model",
        required=True,
        help="base model: .safetensors checkpoint or diffusers folder (Flux: the transformer file, an all-in-one "
        "checkpoint or a diffusers folder)",
    )
    from ..flux_io import add_text_encoder_argument

    add_text_encoder_argument(p)
    p.add_argument(
        "--t5-length",
        type=int,
        choices=(256, 512),
        default=256,
        help="Flux: T5 tokens per prompt (256 as ComfyUI and Forge; 512 as diffusers' dev default)",
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="TEXT",
        help="concept to erase (repeatable; ';' also separates concepts)",
    )
    p.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="TEXT",
        help="concept to map each target onto (one per target, or one for all; default \"\"; ';' also separates)",
    )
    p.add_argument(
        "--preserve",
        action="append",
        default=[],
        metavar="TEXT",
        help="concept whose outputs should stay as they are (repeatable; ';' also separates)",
    )
    p.add_argument("--method", choices=METHODS, default=METHODS[0], help=METHOD_HELP)
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="checkpoint",
        help="checkpoint: the edited model in its input format; lora: only the edit as a kohya "
        "LoRA (exact rank, or --rank via SVD; Flux: PEFT names, the T5 part as a T5 file beside it, "
        "docs/flux.md); diff: the edit as full-rank .diff LoRA (not for Flux)",
    )
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (SVD-truncated, error reported)")
    p.add_argument("--out", required=True, help="output file (or folder for a diffusers checkpoint)")
    p.add_argument("--report", default=None, help="write the JSON report here")
    g = p.add_argument_group("advanced")
    g.add_argument(
        "--tokens",
        choices=O["tokens"].choices,
        default=O["tokens"].default,
        help="which token features to edit (docs/method.md, 'Token features and pairing')",
    )
    g.add_argument(
        "--expand",
        dest="expand",
        action="store_true",
        default=None,
        help="use prompt templates (default for erasepro/zero-residual)",
    )
    g.add_argument("--no-expand", dest="expand", action="store_false", help="use the bare concepts only")
    g.add_argument(
        "--template",
        action="append",
        default=[],
        metavar="TEXT",
        help='extra prompt template with {} for the concept, e.g. "a photo of {} at night"',
    )
    g.add_argument(
        "--te-sublayers",
        type=_sublayers,
        default=O["te_sublayers"].default,
        help="text-encoder sub-layers edited by erasepro (comma list)",
    )
    g.add_argument("--te-layers", type=_layer_range, default=None, help=O["te_layers"].cli_help)
    g.add_argument("--lam", type=float, default=O["lam"].default, help=O["lam"].cli_help)
    g.add_argument("--eta-preserve", type=float, default=O["eta_preserve"].default, help=O["eta_preserve"].cli_help)
    g.add_argument("--rcond", type=float, default=O["rcond"].default, help=O["rcond"].cli_help)
    g.add_argument(
        "--ridge",
        type=float,
        default=None,
        help="ridge (× ‖XᵀX‖_F); default: exact when the features are well-conditioned, else 1e-2; "
        "0: always the exact pseudoinverse",
    )
    g.add_argument(
        "--cond-limit",
        type=float,
        default=O["cond_limit"].default,
        help="smallest kept singular value (relative) for the exact solve",
    )
    g.add_argument("--max-pad", type=int, default=None, help="padding tokens kept after EOS")
    g.add_argument(
        "--exact-subspace",
        type=float,
        default=None,
        metavar="T",
        help="split solve: exact on the features' principal subspace (singular values ≥ T·σ_max), "
        "ridge (--ridge, default 1e-2) on the rest; default off (docs/method.md, 'Split solve and "
        "column merging')",
    )
    g.add_argument(
        "--merge-tol",
        type=float,
        default=None,
        metavar="TAU",
        help="merge feature columns closer than TAU·‖column‖ before the solve (0: exact duplicates); default off",
    )
    g.add_argument(
        "--harden-rounds", type=int, default=O["harden_rounds"].default, metavar="N", help=O["harden_rounds"].cli_help
    )
    g.add_argument(
        "--harden-reg", type=float, default=O["harden_reg"].default, metavar="REG", help=O["harden_reg"].cli_help
    )
    g.add_argument("--clip-skip", type=int, default=None, help="CLIP layer the UNet reads (SD1/SD2)")
    g.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for single-file checkpoints")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check_out(args) -> Path:
    """Every written path (--out, --report) is new to the run: none is an input or inside an input
    folder, they differ from each other, and their folders exist and are writable."""
    from ..safe_io import check_paths, check_writable_file

    out = Path(args.out)
    model = Path(args.model)
    report = Path(args.report) if args.report else None
    inputs = {"the input model (--model)": model}
    if args.tokenizer:
        inputs["the --tokenizer folder"] = args.tokenizer
    for f in getattr(args, "text_encoder", None) or ():
        inputs[f"the --text-encoder file {f}"] = f
    check_paths({"--out": out, "--report": report}, inputs)
    if args.format == "checkpoint" and model.is_dir():
        require(
            out.suffix.lower() != ".safetensors",
            f"--model is a diffusers folder, so the edited model is written as a folder too; --out {out} "
            f"is a file name. Pass a new folder name (e.g. {out.with_suffix('')}), or --format lora.",
        )
        require(not out.exists(), f"--out {out} already exists; choose a new folder name for the edited model.")
    else:
        require(
            out.suffix.lower() == ".safetensors",
            f"--out must be a .safetensors file for --format {args.format}, got {out.name!r}.",
        )
    require(out.parent.exists() or not str(out.parent), f"the folder {out.parent} does not exist; create it first.")
    check_writable_file(out, "--out")
    if report is not None:
        require(
            report.parent.exists() or not str(report.parent),
            f"the folder {report.parent} of --report does not exist; create it first.",
        )
        check_writable_file(report, "--report", stream_ok=True)
    if args.rank is not None:
        from ..lora_write import check_rank

        check_rank(args.rank)
    if args.tokenizer:
        require(
            Path(args.tokenizer).exists(),
            f"--tokenizer {args.tokenizer} does not exist; pass a CLIP "
            "tokenizer folder (vocab.json + merges.txt) or leave it out.",
        )
    return out


def options_values(args) -> dict:
    """The EraseOptions fields the command line sets (the rest keep their defaults)."""
    return dict(
        tokens=args.tokens,
        expand_prompts=args.expand,
        extra_templates=tuple(args.template),
        te_sublayers=args.te_sublayers,
        te_layers=args.te_layers,
        lam=args.lam,
        eta_preserve=args.eta_preserve,
        rcond=args.rcond,
        ridge=args.ridge,
        cond_limit=args.cond_limit,
        max_pad=args.max_pad,
        exact_subspace=args.exact_subspace,
        merge_tol=args.merge_tol,
        harden_rounds=args.harden_rounds,
        harden_reg=args.harden_reg,
    )


def run(args) -> int:
    from ..lora_write import save_lora
    from ..model_io import load_model, save_edited_model
    from ..progress import tqdm_progress
    from .pipeline import erase

    out = _check_out(args)
    opts = from_values(EraseOptions, options_values(args), where="weightsmith erase")
    from .pipeline import check_method_options, validate_concepts

    check_method_options(args.method, opts)

    from ..prompt_lists import cli_list

    # each value may hold several concepts separated by ';' (core.prompt_lists)
    targets, anchors, preserve = cli_list(args.target), cli_list(args.anchor), cli_list(args.preserve)
    validate_concepts(targets, anchors, preserve)  # fail before loading the model
    from ..flux_io import is_flux, require_flux_format, save_flux_edit, t5_base

    if bool(args.text_encoder) or is_flux(args.model):  # before the model is read
        require_flux_format(args.format)
    model = load_model(
        args.model,
        clip_skip=args.clip_skip,
        tokenizer=args.tokenizer,
        text_encoders=args.text_encoder,
        t5_length=args.t5_length,
    )
    flux = getattr(model, "parts", None) is not None  # a FluxModel: written by the Flux writers
    bar = None if args.quiet else tqdm_progress(f"erase ({args.method})")
    try:
        edit = erase(
            model,
            targets,
            anchors or [""],
            preserve,
            args.method,
            opts,
            progress=bar,
            warn=lambda m: print(f"weightsmith: warning: {m}", file=sys.stderr),
        )
    finally:
        if bar is not None:
            bar.close()
    meta = {
        "ws_method": args.method,
        "ws_targets": json.dumps(edit.report["targets"]),
        "ws_anchors": json.dumps(edit.report["anchors"]),
    }
    if flux and args.format == "checkpoint":
        info = save_flux_edit(model, edit.deltas, out, meta)
        edit.report["export"] = {"format": "checkpoint", **info}
    elif args.format == "checkpoint":
        save_edited_model(model, edit.deltas, out, meta)
        edit.report["export"] = {"format": "checkpoint"}
    else:
        t5 = {"t5_base": t5_base(model)} if flux and any(n.startswith("text_encoder_2.") for n in edit.deltas) else {}
        info = save_lora(edit, out, rank=args.rank, fmt=args.format, metadata=meta, **t5)
        edit.report["export"] = {
            "format": args.format,
            "rank": info["rank"],
            "max_rel_error": info["max_error"],
            "errors": info["errors"],
        }
        if info.get("t5_file"):
            edit.report["export"].update(t5_file=info["t5_file"], note=info.get("note", ""))
    if args.report:
        from ..safe_io import write_report_after

        write_report_after(edit.report, Path(args.report), out)
    print_summary(edit.report, out)
    return 0


def write_report(report: dict, path: Path) -> None:
    """The JSON report, written atomically (no temp file is left behind on any error)."""
    from ..safe_io import write_json

    write_json(path, report)


def print_summary(report: dict, out: Path) -> None:
    print(
        f"{report['method']} on {report['family']}: erased {', '.join(report['targets'])} "
        f"-> {', '.join(repr(a) for a in report['anchors'])} in {report['time_s']:.2f} s"
    )
    print(f"{'stage':<28}{'matrices':>9}{'‖Δ‖/‖W‖':>10}{'res. before':>12}{'res. after':>11}{'ρ max':>10}")
    for s in report["summary"]:
        print(
            f"{s['stage']:<28}{s['matrices']:>9}{s['delta_rel_mean']:>10.4f}{s['residual_before_mean']:>12.4f}"
            f"{s['residual_after_mean']:>11.2e}{s['rho_max']:>10.2e}"
        )
    from ..report import hardening_lines

    for line in hardening_lines(report):
        print(line)
    exp = report.get("export", {})
    low = [v for v in exp.get("stored", {}).values() if v["dtype"].startswith("float8")]
    if low:
        kept = min(v["kept"] for v in low)
        err = max(v["rel_error"] for v in low)
        print(
            f"fp8 storage: {len(low)} edited tensor(s) keep at least {kept:.1%} of the edit (largest relative "
            f"error {err:.2e}; docs/flux.md, 'fp8')"
        )
    for f in exp.get("files", [])[1:] + ([exp["t5_file"]] if exp.get("t5_file") else []):
        print(f"wrote {f}")
    if exp.get("format") in ("lora",):
        print(f"LoRA rank {exp['rank']}, max relative export error {exp['max_rel_error']:.2e}")
    print(f"wrote {out}")
