"""Block weights as LoRA Block Weight (LBW) and SuperMerger users write them (docs/merge.md, "Block weights").

A block-weight string gives each *block* of the model a multiplier; every module of a LoRA gets the
multiplier of the block it lies in, times the LoRA's own weight. The block ids, the vector lengths
and the presets are those of the A1111 extension LoRA Block Weight
(hako-mikan/sd-webui-lora-block-weight, ``scripts/lora_block_weight.py``: ``BLOCKID26``,
``BLOCKID17``, ``BLOCKID12``, ``BLOCKID20``, ``DEF_WEIGHT_PRESET``), which SuperMerger
(hako-mikan/sd-webui-supermerger, ``scripts/mergers/pluslora.py``) reuses:

- ``BASE``: every text-encoder module (LBW: keys containing ``encoder``, ``embedders`` or
  ``transformer_resblocks``).
- ``INnn`` / ``M00`` / ``OUTnn``: the UNet's ``input_blocks.nn`` / ``middle_block`` /
  ``output_blocks.nn`` in the original (LDM) numbering (LBW: keys containing
  ``diffusion_model_input_blocks_nn_`` ...).
- Modules in no block (``time_embed``, ``label_emb``, ``out``: only LoCon-style LoRAs train them)
  keep weight 1, as in LBW (which multiplies by 1 what it does not recognise).
- A vector shorter than the family's full one names a subset of the blocks (LBW's ``to26``); the
  blocks it does not name get weight 0, as in LBW.

Accepted forms (``parse``): empty (no block weights), a preset name (case-insensitive), or
comma-separated numbers of one of the family's lengths (SD1.x/SD2.x: 17 or 26; SDXL: 12 or 20).
LBW's presets are 17-value vectors: on SDXL they are applied by block id exactly as LBW applies them
there. LBW's random letters (``R``, ``U``, ``X``) and its element-wise ``lbwe`` syntax are not
supported (a saved file should not depend on a random draw).

Flux.1 (LBW's ``BLOCKIDFLUX``, 61 values: ``CLIP``, ``T5``, ``IN``, ``D00``-``D18``, ``S00``-``S37``,
``OUT``; LBW's ``get_flux_blocks``): CLIP-L and T5 modules, the double and single blocks by index, the
input embedders (``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``) as ``IN`` and
``final_layer`` as ``OUT``. Only the 61-value vector (and the ``FLUXALL`` preset) applies to Flux, as in
LBW. Importable without torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import WeightsmithError

# LoRA Block Weight, scripts/lora_block_weight.py (BLOCKID26/17/12/20): the same ids in the same order.


def _ids(ins, outs):
    """BASE, the named input blocks, M00, the named output blocks: the order of LBW's BLOCKID lists."""
    return ("BASE", *(f"IN{i:02d}" for i in ins), "M00", *(f"OUT{i:02d}" for i in outs))


BLOCKID26 = _ids(range(12), range(12))
BLOCKID17 = _ids((1, 2, 4, 5, 7, 8), range(3, 12))
BLOCKID12 = _ids((4, 5, 7, 8), range(6))
BLOCKID20 = _ids(range(9), range(9))

# LoRA Block Weight's default presets (DEF_WEIGHT_PRESET; SuperMerger's LWEIGHTSPRESETS holds the same
# ten), 17 values each, in BLOCKID17 order; then LBW's FLUXALL (61 ones, BLOCKIDFLUX order).
BLOCKIDFLUX = ("CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT")
PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5,) * 17,
    "FLUXALL": (1,) * 61,
}
PRESET_IDS = BLOCKID17  # the block ids a preset's values stand for

_LDM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)(\.|$)")


def _sd_block(canonical: str, layout) -> str | None:
    """LBW's block of an SD1.x/SD2.x/SDXL module (canonical name, core/naming.py), None if in no block."""
    comp, _, path = canonical.partition(".")
    if comp.startswith("text_encoder"):
        return "BASE"
    if comp != "unet":
        return None
    try:
        ldm = layout.to_ldm(path)
    except KeyError:
        return None
    if ldm == "middle_block" or ldm.startswith("middle_block."):
        return "M00"
    m = _LDM_BLOCK.match(ldm)
    if not m:
        return None  # time_embed, label_emb, out: in no LBW block
    return ("IN" if m.group(1) == "input_blocks" else "OUT") + f"{int(m.group(2)):02d}"


_FLUX_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_FLUX_IN = ("x_embedder", "context_embedder", "time_text_embed.")  # BFL img_in, txt_in, time/vector/guidance_in
_FLUX_OUT = ("norm_out.", "proj_out")  # BFL final_layer.adaLN_modulation.1, final_layer.linear


def _flux_block(canonical: str, layout=None) -> str | None:
    """LBW's block of a Flux.1 module (canonical diffusers name), None if in no block."""
    comp, _, path = canonical.partition(".")
    if comp == "text_encoder":
        return "CLIP"
    if comp == "text_encoder_2":
        return "T5"
    if comp != "transformer":
        return None
    m = _FLUX_BLOCK.match(path)
    if m:
        return ("D" if m.group(1) == "transformer_blocks" else "S") + f"{int(m.group(2)):02d}"
    if path.startswith(_FLUX_IN):
        return "IN"
    if path.startswith(_FLUX_OUT):
        return "OUT"
    return None


@dataclass(frozen=True)
class BlockTable:
    """One family's block vocabulary: every block id in order, the vector lengths it accepts (length ->
    the ids its values stand for) and the function giving a module's block."""

    family: str
    ids: tuple[str, ...]
    vectors: dict[int, tuple[str, ...]]
    block_of: Callable = field(compare=False, default=_sd_block)

    def describe(self) -> str:
        return "; ".join(f"{n} values = {','.join(ids)}" for n, ids in sorted(self.vectors.items()))


TABLES: dict[str, BlockTable] = {
    "sd1": BlockTable("sd1", BLOCKID26, {17: BLOCKID17, 26: BLOCKID26}),
    "sd2": BlockTable("sd2", BLOCKID26, {17: BLOCKID17, 26: BLOCKID26}),
    "sdxl": BlockTable("sdxl", BLOCKID20, {12: BLOCKID12, 20: BLOCKID20}),
    "flux": BlockTable("flux", BLOCKIDFLUX, {61: BLOCKIDFLUX}, _flux_block),
}

BLOCKS_HELP = (
    "Block weights as LoRA Block Weight writes them: a preset (" + ", ".join(PRESETS) + ") or "
    "comma-separated numbers, 17 or 26 for SD1.x/SD2.x (BASE,IN01,IN02,IN04,IN05,IN07,IN08,M00,"
    "OUT03..OUT11), 12 or 20 for SDXL (BASE,IN04,IN05,IN07,IN08,M00,OUT00..OUT05), 61 for Flux.1 "
    "(CLIP,T5,IN,D00..D18,S00..S37,OUT); empty = every block 1. BASE is the text encoder(s). Each "
    "module's weight is its block's value times the LoRA's weight (docs/merge.md, 'Block weights')."
)


def table(family: str) -> BlockTable:
    t = TABLES.get(family)
    if t is None:
        raise WeightsmithError(
            f"block weights are not defined for the {family!r} family yet; they are for "
            f"{', '.join(TABLES)} (docs/merge.md, 'Block weights')."
        )
    return t


def parse_presets(text: str) -> dict[str, tuple[float, ...]]:
    """User presets in LBW's ``lbwpresets.txt`` format: ``NAME:v1,v2,...`` per line; as in LBW, lines
    without ``:``, with ``#`` or with a value count LBW does not know (12, 17, 20, 26, 61) are skipped."""
    out = {}
    for line in (text or "").splitlines():
        line = line.strip()
        if ":" not in line or "#" in line:
            continue
        name, _, vals = line.partition(":")
        parts = [v.strip() for v in vals.split(",")]
        if len(parts) not in (12, 17, 20, 26, 61):
            continue
        try:
            nums = tuple(float(v) for v in parts)
        except ValueError:
            continue
        out[name.strip()] = nums
    return out


def is_spec(text: str, presets: dict | None = None) -> bool:
    """Whether ``text`` reads as a block-weight string (a preset name or comma-separated numbers), for
    parsers that must tell it from a file name or a number."""
    t = (text or "").strip()
    if not t:
        return False
    if _preset(t, presets) is not None:
        return True
    parts = t.split(",")
    if len(parts) < 2:
        return False
    try:
        [float(p) for p in parts]
    except ValueError:
        return False
    return True


def _preset(name: str, presets: dict | None):
    allp = dict(PRESETS)
    allp.update(presets or {})
    if name in allp:
        return allp[name]
    low = {k.lower(): v for k, v in allp.items()}
    return low.get(name.lower())


@dataclass(frozen=True)
class BlockWeights:
    """A parsed block-weight string for one family: ``weights`` (block id -> value, every id of the
    family), and the text it came from."""

    family: str
    spec: str
    weights: dict

    def of(self, canonical: str, layout) -> float:
        """The multiplier of module ``canonical`` (1 for modules in no block)."""
        b = table(self.family).block_of(canonical, layout)
        return 1.0 if b is None else float(self.weights.get(b, 0.0))

    def is_identity(self) -> bool:
        return all(v == 1.0 for v in self.weights.values())


def parse(spec, family: str, presets: dict | None = None) -> BlockWeights | None:
    """A block-weight string (see the module docstring) for ``family``; None for empty (no block weights).
    Raises :class:`WeightsmithError` naming the family's lengths, block ids and presets when it does not fit."""
    if spec is None:
        return None
    if isinstance(spec, BlockWeights):
        return spec
    text = str(spec).strip()
    if not text:
        return None
    t = table(family)
    vals = _preset(text, presets)
    from_preset = vals is not None
    if vals is None:
        parts = [p.strip() for p in text.split(",")]
        try:
            vals = tuple(float(p) for p in parts)
        except ValueError:
            bad = next(p for p in parts if not _isfloat(p))
            raise WeightsmithError(
                f"block weights {text!r}: {bad!r} is neither a number nor a preset. Write a preset ("
                f"{', '.join(sorted(set(PRESETS) | set(presets or {})))}) or comma-separated numbers; for "
                f"{family.upper()}: {t.describe()}. Random letters (R, U, X) are not supported."
            ) from None
    if not all(math.isfinite(v) for v in vals):
        raise WeightsmithError(f"block weights {text!r}: every value must be a finite number.")
    n = len(vals)
    ids = t.vectors.get(n)
    unet_ids = set(t.ids) <= set(BLOCKID26)  # an SD family (LBW's presets are SD vectors)
    if ids is None and from_preset and n == len(PRESET_IDS) and unet_ids:
        ids = PRESET_IDS  # LBW's 17-value presets on SDXL: applied by block id, as LBW does
    if ids is None:
        raise WeightsmithError(
            f"block weights {text!r} have {n} value(s), but {family.upper()} takes "
            f"{' or '.join(str(k) for k in sorted(t.vectors))}: {t.describe()}. "
            + ("BASE is the text encoder(s)." if unet_ids else "Use FLUXALL or 61 values, as LoRA Block Weight does.")
        )
    w = {b: 0.0 for b in t.ids}  # blocks the vector does not name: 0 (LBW's to26)
    for b, v in zip(ids, vals):
        if b in w:
            w[b] = float(v)
    return BlockWeights(family, text, w)


def _isfloat(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def module_weights(names, bw: BlockWeights, layout) -> dict[str, float]:
    """Each module's multiplier under ``bw`` (canonical names, core/naming.py)."""
    return {n: bw.of(n, layout) for n in names}


def block_summary(names, bw: BlockWeights, layout) -> dict:
    """The report row of one LoRA's block weights: the string, the weight each block got and how many of
    the LoRA's modules lie in it (blocks holding none of them are left out; ``-`` gathers the modules in
    no block, which keep weight 1)."""
    t = table(bw.family)
    count: dict[str, int] = {}
    for n in names:
        b = t.block_of(n, layout) or "-"
        count[b] = count.get(b, 0) + 1
    blocks = [
        {"block": b, "weight": (1.0 if b == "-" else bw.weights.get(b, 0.0)), "modules": count[b]}
        for b in list(t.ids) + ["-"]
        if b in count
    ]
    return {"spec": bw.spec, "blocks": blocks}


def apply(lora, spec, model, presets: dict | None = None):
    """``lora`` (bound to ``model``) with each module's scale multiplied by its block weight; modules of
    weight 0 are dropped (the LoRA then does not adapt them, as a file without them). Returns
    ``(lora, summary)``; ``(lora, None)`` unchanged for an empty string. The input LoRA is not modified."""
    import dataclasses

    bw = parse(spec, model.family, presets)
    if bw is None:
        return lora, None
    layout = getattr(model, "layout", None)  # Flux's blocks are read from the names alone
    summary = block_summary(lora.modules, bw, layout)
    mods = {}
    for n, m in lora.modules.items():
        w = bw.of(n, layout)
        if w != 0.0:
            mods[n] = dataclasses.replace(m, scale=m.scale * w)
    if not mods:
        raise WeightsmithError(
            f"block weights {bw.spec!r} give every module of LoRA {lora.name} weight 0; "
            "nothing of it would be left. Give its blocks a non-zero weight."
        )
    out = dataclasses.replace(lora, modules=mods, notes=list(lora.notes))
    if len(mods) < len(lora.modules):
        summary["dropped"] = len(lora.modules) - len(mods)
    return out, summary


def file_metadata(report: dict) -> dict:
    """``{"ws_blocks": JSON {LoRA name: string}}`` for a written LoRA whose merge used block weights
    (every front end's writer adds it), else ``{}``."""
    import json

    blocks = {
        d.get("name"): d["blocks"]["spec"]
        for d in (report or {}).get("loras") or []
        if isinstance(d, dict) and d.get("blocks")
    }
    return {"ws_blocks": json.dumps(blocks)} if blocks else {}


def summary_line(name: str, summary: dict) -> str:
    """One line per LoRA for text reports: ``name [SPEC]: BASE 1, IN01 0, ...``."""
    parts = [f"{b['block']} {b['weight']:g}" for b in summary.get("blocks", [])]
    return f"{name} [{summary.get('spec')}]: " + ", ".join(parts)


# -- the hosts' fields (one rule for ComfyUI's Stack node and the A1111/Forge tab) ------------------
NO_PRESET = "none"
PRESET_CHOICES = (NO_PRESET,) + tuple(PRESETS)


def host_spec(preset: str | None, text: str | None) -> str | None:
    """A host's preset dropdown plus text field as one block-weight string: the text when it is not
    empty, else the preset (``none``: no block weights)."""
    t = (text or "").strip()
    if t:
        return t
    p = (preset or "").strip()
    return None if not p or p == NO_PRESET else p


def per_lora(text: str | None, n: int) -> list | None:
    """The A1111/Forge tab's block-weight field: one line per LoRA in the order picked (a preset or a
    vector; an empty line or ``none`` = no block weights for that LoRA), or one line for all LoRAs;
    empty = none at all."""
    lines = [ln.strip() for ln in (text or "").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not any(lines):
        return None
    lines = [None if ln in ("", NO_PRESET) else ln for ln in lines]
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise WeightsmithError(
            f"block weights: {len(lines)} lines for {n} LoRAs; write one line per LoRA in the "
            "order picked (an empty line or 'none' for a LoRA without block weights), or one "
            "line for all."
        )
    return lines
