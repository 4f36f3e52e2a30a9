"""``weightsmith lora reweight``: block-weight one LoRA and save it (docs/merge.md, "Block weights").

The saved file is an exact kohya LoRA whose every module is ``weight × block weight × ΔW`` of the
input: a one-LoRA ``concat`` merge (exact factors, no SVD) written by the merge writer. Modules of
block weight 0 are left out of the file (a host then changes nothing there, as with weight 0).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..blockweights import BLOCKS_HELP
from ..errors import WeightsmithError

EPILOG = """examples:
  weightsmith lora reweight A.safetensors --model sd15.safetensors --blocks OUTALL --out A_outall.safetensors
  weightsmith lora reweight A.safetensors --model sdxl.safetensors --blocks 1,0,0,0,0,1,1,1,1,0,0,0 \\
      --weight 0.8 --out A_mid.safetensors
The base model maps the LoRA's keys onto modules and blocks; it is read, never written."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "lora",
        help="work on one LoRA file (reweight: block weights saved into it)",
        description="Tools for a single LoRA file.",
    )
    sub = p.add_subparsers(dest="lora_command", metavar="ACTION")
    r = sub.add_parser(
        "reweight",
        help="apply block weights (LoRA Block Weight syntax) and save an exact LoRA",
        description="Multiply each module of a LoRA by its block's weight (and --weight) and write "
        "the result as an exact kohya LoRA that loads in ComfyUI, A1111/Forge and "
        "diffusers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("lora", metavar="LORA", help="the LoRA file (.safetensors)")
    r.add_argument("--model", required=True, help="its base model: single-file .safetensors or diffusers folder")
    r.add_argument("--blocks", required=True, help=BLOCKS_HELP.replace("%", "%%"))
    r.add_argument("--weight", type=float, default=1.0, help="overall weight, times each block's (default 1)")
    r.add_argument(
        "--block-presets", default=None, metavar="FILE", help="extra presets, LoRA Block Weight's lbwpresets.txt format"
    )
    r.add_argument("--out", required=True, help="the new LoRA file (.safetensors)")
    r.add_argument("--report", default=None, help="write a JSON report here")
    r.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for single-file checkpoints")
    r.set_defaults(func=run, format="lora")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args) -> int:
    from ..lora_read import load_lora
    from ..model_io import load_model
    from .api import save_merge
    from .cli import check_outputs, read_block_presets

    if not math.isfinite(args.weight):
        raise WeightsmithError(f"--weight must be a finite number, got {args.weight!r}.")
    out = check_outputs(args, [(args.lora, args.weight)])
    presets = read_block_presets(args.block_presets)
    model = load_model(args.model, tokenizer=args.tokenizer)
    from ..blockweights import parse

    parse(args.blocks, model.family, presets)  # the string's own error before reading the LoRA
    lora = load_lora(args.lora, model)
    for n in lora.notes:
        print(f"weightsmith: note: {lora.name}: {n}", file=sys.stderr)
    edit = reweight(model, lora, args.blocks, args.weight, presets)
    written = save_merge(edit, model, out, fmt="lora", loras=[lora])
    rep = dict(edit.report)
    rep["output"] = {k: v for k, v in written.items() if k != "errors"}
    if args.report:
        from ..safe_io import write_report_after

        write_report_after(rep, Path(args.report), out)
    from ..report import block_lines

    kept = len(edit.deltas)
    print(f"wrote {out} ({kept} of {len(lora.modules)} modules kept, rank {written.get('rank')}, exact)")
    for line in block_lines(rep):
        print(line)
    return 0


def reweight(model, lora, blocks, weight: float = 1.0, presets: dict | None = None):
    """The :class:`~weightsmith.core.edit.Edit` of ``lora`` under block weights ``blocks`` and ``weight``
    (exact factors; modules of weight 0 absent). Front ends save it with :func:`.api.save_merge`."""
    if not str(blocks or "").strip():
        raise WeightsmithError(
            "reweight needs block weights (--blocks), e.g. OUTALL or 1,0,0,...; see docs/merge.md, 'Block weights'."
        )
    from .api import merge

    edit = merge(model, [lora], "concat", weights=[weight], blocks=[blocks], block_presets=presets)
    edit.report["method"] = "reweight"
    return edit
