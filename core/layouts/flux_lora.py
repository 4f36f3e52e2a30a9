"""Flux.1 LoRA key layouts: reading every common layout into canonical modules, and the one layout
written (docs/flux_lora.md).

Read (mixed freely within one file), each into exact 2-D factors per canonical module
(``ΔW = scale · up @ down``, canonical names as in :mod:`.flux_names`):

- **sd-scripts / kohya**: ``lora_unet_<BFL name with _>`` (``lora_unet_double_blocks_0_img_attn_qkv``,
  fused) or ``lora_unet_<diffusers name with _>``, ``.lora_down/.lora_up.weight``, ``.alpha``;
  CLIP-L ``lora_te_``/``lora_te1_text_model_…``; T5 ``lora_te3_``/``lora_te2_encoder_block_…``.
- **diffusers / PEFT / ai-toolkit**: ``transformer.<diffusers module>.lora_A/lora_B.weight`` (+ optional
  ``transformer.<module>.alpha``), ``base_model.model.`` prefix, ``text_encoder.text_model.…``.
- **ComfyUI-saved / generic**: ``diffusion_model.<BFL name>.lora_up/lora_down.weight``, ``.diff``
  (full delta), ``.diff_b`` (bias delta: not part of a weight edit, listed as ignored),
  ``text_encoders.clip_l.transformer.…``, ``text_encoders.t5xxl.transformer.…``, ``….linear1_qkv``.
- **XLabs**: ``double_blocks.N.processor.qkv_lora1/proj_lora1/qkv_lora2/proj_lora2.down/up.weight``,
  ``single_blocks.N.processor.qkv_lora/proj_lora`` (no alpha: scale 1, as every host applies them).
- **OneTrainer / SimpleTuner**: ``lora_transformer_<diffusers name with _>``, ``lycoris_<…>``.

A fused BFL factor pair (``up`` 3H×r for ``qkv``, (3H+M)×r for ``linear1``) is the same ΔW as split
modules sharing ``down`` with ``up`` cut into row blocks (docs/flux_lora.md, "Fused layers"); a
block-diagonal ``up`` (sd-scripts ``split_qkv=True``) is cut in rank too. ``norm_out`` factors named in
BFL order (shift, scale) have their up rows swapped into diffusers order. Scales follow what the hosts
apply: ``alpha / r`` with ``r`` the file's rank (for a fused module: the fused rank), no alpha → 1.

Written (:func:`write_tensors`): diffusers/PEFT names with the fused layers split,
``transformer.<module>.lora_A/lora_B.weight`` with the scale baked in (no alpha keys), CLIP-L as
``text_encoder.text_model.encoder.layers.N.<c>.lora_A/B.weight``: the layout ComfyUI, Forge and
diffusers all load in full. T5 deltas are no LoRA any host shares; :func:`t5_edited_state` writes them
into a full T5 encoder file instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from ..errors import WeightsmithError
from .flux_names import (
    CLIP_L,
    DOUBLE,
    SINGLE,
    SWAPPED,
    T5,
    TOP,
    TRANSFORMER,
    bfl_to_diffusers,
    diffusers_to_bfl,
    swap_halves,
)

FAMILY = "flux"
BASE_MODEL_VERSION = "flux1"  # ss_base_model_version as sd-scripts writes it for Flux.1

# suffix -> role, longest first
_SUFFIXES = sorted(
    [
        (".lora_down.weight", "down"),
        (".lora_up.weight", "up"),
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".down.weight", "down"),  # XLabs
        (".up.weight", "up"),
        (".alpha", "alpha"),
        (".diff", "diff"),
        (".diff_b", "diff_b"),
        (".lora_B.bias", "bias"),
        (".set_weight", "refused"),
        (".dora_scale", "refused"),
        (".lora_mid.weight", "refused"),
        (".hada_w1_a", "refused"),
        (".hada_w1_b", "refused"),
        (".hada_w2_a", "refused"),
        (".hada_w2_b", "refused"),
        (".lokr_w1", "refused"),
        (".lokr_w2", "refused"),
        (".lokr_w1_a", "refused"),
        (".lokr_w1_b", "refused"),
        (".lokr_w2_a", "refused"),
        (".lokr_w2_b", "refused"),
        (".oft_blocks", "refused"),
    ],
    key=lambda s: -len(s[0]),
)

CLIP_SUBS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
T5_SUBS = (
    "layer.0.SelfAttention.q",
    "layer.0.SelfAttention.k",
    "layer.0.SelfAttention.v",
    "layer.0.SelfAttention.o",
    "layer.1.DenseReluDense.wi_0",
    "layer.1.DenseReluDense.wi_1",
    "layer.1.DenseReluDense.wi",
    "layer.1.DenseReluDense.wo",
)
_US = {s.replace(".", "_"): s for s in CLIP_SUBS}
_US_T5 = {s.replace(".", "_"): s for s in T5_SUBS}
_US_BFL_DOUBLE = {k.replace(".", "_"): k for k in DOUBLE}
_US_BFL_SINGLE = {k.replace(".", "_"): k for k in SINGLE}
_US_BFL_TOP = {k.replace(".", "_"): k for k in TOP}


def _inner_diffusers(table) -> set:
    out = set()
    for e in table.values():
        out |= {e} if isinstance(e, str) else {p[0] for p in e}
    return out


_DIFF_DOUBLE = _inner_diffusers(DOUBLE)
_DIFF_SINGLE = _inner_diffusers(SINGLE)
_DIFF_TOP = set(TOP.values())
_US_DIFF_DOUBLE = {k.replace(".", "_"): k for k in _DIFF_DOUBLE}
_US_DIFF_SINGLE = {k.replace(".", "_"): k for k in _DIFF_SINGLE}
_US_DIFF_TOP = {k.replace(".", "_"): k for k in _DIFF_TOP}

_BLOCK_US = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)_(\d+)_(.+)$")
_BLOCK_DOT = re.compile(r"^(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_XLABS = re.compile(
    r"^(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)$"
)
_XLABS_MAP = {
    ("double_blocks", "qkv_lora1"): ("img_attn.qkv", None),
    ("double_blocks", "proj_lora1"): ("img_attn.proj", None),
    ("double_blocks", "qkv_lora2"): ("txt_attn.qkv", None),
    ("double_blocks", "proj_lora2"): ("txt_attn.proj", None),
    ("single_blocks", "qkv_lora"): ("linear1", 3),  # the first three pieces (q, k, v) of linear1
    ("single_blocks", "proj_lora"): ("linear2", None),
}
_CLIP_US = re.compile(r"^text_model_encoder_layers_(\d+)_(.+)$")
_T5_US = re.compile(r"^encoder_block_(\d+)_(.+)$")
_CLIP_DOT = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)$")
_T5_DOT = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Target:
    """What a LoRA key prefix names: a transformer tensor in BFL terms (``bfl`` set; ``pieces``: how
    many of its fused pieces, None = all) or in diffusers terms (``diffusers`` set), or a text-encoder
    module (``canonical`` set); ``fmt``: the layout it was read as."""

    fmt: str
    bfl: str | None = None
    pieces: int | None = None
    diffusers: str | None = None
    canonical: str | None = None


def _bfl_us(s: str) -> str | None:
    """BFL name from its underscored form (``double_blocks_0_img_attn_qkv``), or None."""
    m = _BLOCK_US.match(s)
    if m and m.group(1) in ("double_blocks", "single_blocks"):
        inner = (_US_BFL_DOUBLE if m.group(1) == "double_blocks" else _US_BFL_SINGLE).get(m.group(3))
        return f"{m.group(1)}.{m.group(2)}.{inner}" if inner else None
    return _US_BFL_TOP.get(s) if not m else None


def _diffusers_us(s: str) -> str | None:
    m = _BLOCK_US.match(s)
    if m and m.group(1) in ("transformer_blocks", "single_transformer_blocks"):
        inner = (_US_DIFF_DOUBLE if m.group(1) == "transformer_blocks" else _US_DIFF_SINGLE).get(m.group(3))
        return f"{m.group(1)}.{m.group(2)}.{inner}" if inner else None
    return _US_DIFF_TOP.get(s) if not m else None


def _bfl_dot(s: str) -> str | None:
    m = _BLOCK_DOT.match(s)
    if m and m.group(1) in ("double_blocks", "single_blocks"):
        return s if m.group(3) in (DOUBLE if m.group(1) == "double_blocks" else SINGLE) else None
    return s if (not m and s in TOP) else None


def _diffusers_dot(s: str) -> str | None:
    m = _BLOCK_DOT.match(s)
    if m and m.group(1) in ("transformer_blocks", "single_transformer_blocks"):
        return s if m.group(3) in (_DIFF_DOUBLE if m.group(1) == "transformer_blocks" else _DIFF_SINGLE) else None
    return s if (not m and s in _DIFF_TOP) else None


def _clip(path_us: str | None = None, path_dot: str | None = None) -> str | None:
    if path_us is not None:
        m = _CLIP_US.match(path_us)
        sub = m and _US.get(m.group(2))
    else:
        m = _CLIP_DOT.match(path_dot)
        sub = m and m.group(2) in CLIP_SUBS and m.group(2)
    return f"{CLIP_L}.text_model.encoder.layers.{m.group(1)}.{sub}" if sub else None


def _t5(path_us: str | None = None, path_dot: str | None = None) -> str | None:
    if path_us is not None:
        m = _T5_US.match(path_us)
        sub = m and _US_T5.get(m.group(2))
    else:
        m = _T5_DOT.match(path_dot)
        sub = m and m.group(2) in T5_SUBS and m.group(2)
    return f"{T5}.encoder.block.{m.group(1)}.{sub}" if sub else None


def target_of(prefix: str) -> Target | None:
    """The module a Flux LoRA key prefix (the key without ``.lora_down.weight`` etc.) names, or None."""
    p = prefix.removeprefix("base_model.model.")
    # kohya / sd-scripts
    if p.startswith("lora_unet_"):
        s = p[len("lora_unet_") :]
        if s.endswith("_linear1_qkv") and (b := _bfl_us(s[: -len("_qkv")])):
            return Target("kohya", bfl=b, pieces=3)
        b = _bfl_us(s)
        if b:
            return Target("kohya", bfl=b)
        d = _diffusers_us(s)
        return Target("kohya", diffusers=d) if d else None
    for pre, fmt in (("lora_transformer_", "onetrainer"), ("lycoris_", "lycoris")):
        if p.startswith(pre):
            d = _diffusers_us(p[len(pre) :])
            return Target(fmt, diffusers=d) if d else None
    for pre in ("lora_te1_", "lora_te_"):
        if p.startswith(pre):
            c = _clip(path_us=p[len(pre) :])
            if c:
                return Target("kohya", canonical=c)
            return None
    for pre in ("lora_te3_", "lora_te2_"):
        if p.startswith(pre):
            c = _t5(path_us=p[len(pre) :])
            return Target("kohya", canonical=c) if c else None
    # text encoders, dotted
    for pre, fmt in (
        ("text_encoders.clip_l.transformer.", "comfyui"),
        ("clip_l.transformer.", "comfyui"),
        (CLIP_L + ".", "diffusers"),
    ):
        if p.startswith(pre):
            c = _clip(path_dot=p[len(pre) :])
            return Target(fmt, canonical=c) if c else None
    for pre, fmt in (
        ("text_encoders.t5xxl.transformer.", "comfyui"),
        ("t5xxl.transformer.", "comfyui"),
        (T5 + ".", "diffusers"),
    ):
        if p.startswith(pre):
            c = _t5(path_dot=p[len(pre) :])
            return Target(fmt, canonical=c) if c else None
    # transformer, dotted
    fmt = "diffusers"
    if p.startswith(TRANSFORMER + "."):
        p = p[len(TRANSFORMER) + 1 :]
    elif p.startswith(("diffusion_model.", "model.diffusion_model.")):
        p, fmt = p.split("diffusion_model.", 1)[1], "comfyui"
    else:
        fmt = "bare"
    m = _XLABS.match(p)
    if m:
        inner, n = _XLABS_MAP.get((m.group(1), m.group(3)), (None, None))
        return Target("xlabs", bfl=f"{m.group(1)}.{m.group(2)}.{inner}", pieces=n) if inner else None
    if p.endswith(".linear1_qkv") and (b := _bfl_dot(p[: -len("_qkv")])):
        return Target(fmt, bfl=b, pieces=3)
    b = _bfl_dot(p)
    if b:
        return Target(fmt, bfl=b)
    d = _diffusers_dot(p)
    return Target(fmt, diffusers=d) if d else None


def split_key(key: str) -> tuple[str, str] | None:
    """(prefix, role) of a LoRA key, or None for a key of no known role."""
    for suf, role in _SUFFIXES:
        if key.endswith(suf):
            return key[: -len(suf)], role
    return None


def looks_like_flux(keys) -> bool:
    """Whether LoRA keys name Flux modules (any layout above). Keys of an SD LoRA never do: Flux's
    BFL and diffusers module names (``double_blocks``, ``single_transformer_blocks``, ``context_embedder``,
    ``processor.qkv_lora``, T5 ``encoder.block``) occur in no SD UNet or CLIP."""
    for k in keys:
        s = split_key(k)
        if s is None:
            continue
        t = target_of(s[0])
        if t is not None and (t.bfl or t.diffusers or (t.canonical or "").startswith(T5 + ".")):
            return True
    return False


@dataclass
class FluxModule:
    """One canonical module read from a Flux LoRA: ``ΔW = scale · up @ down`` (2-D float32)."""

    name: str
    up: torch.Tensor
    down: torch.Tensor
    scale: float
    kind: str = "lora"  # "lora" | "full"
    alpha: float | None = None

    @property
    def shape(self) -> tuple:
        return (int(self.up.shape[0]), int(self.down.shape[1]))


@dataclass
class FluxRead:
    """Everything read from one Flux LoRA file."""

    modules: dict[str, FluxModule]
    formats: set = field(default_factory=set)
    unmatched: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _finite(key: str, t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise WeightsmithError(
            f"LoRA {name} contains NaN or infinite values (in {key}); the file is broken "
            "(often a training run that diverged). Use another file."
        )


def _factors(parts: dict, prefix: str, name: str):
    """(up 2-D, down 2-D, scale, alpha) of a lora_down/lora_up pair, or a full delta as exact factors."""
    if "diff" in parts:
        from ..factor import READ_RTOL, exact_factors

        d = parts["diff"].double()
        if d.dim() != 2:
            raise WeightsmithError(f"LoRA {name}: {prefix}.diff is {d.dim()}-D; Flux linear deltas are 2-D.")
        up, down = exact_factors(d, READ_RTOL)
        return up.float(), down.float(), 1.0, None, "full"
    if not {"up", "down"} <= set(parts):
        raise WeightsmithError(f"LoRA {name}: {prefix} has only one of its two factors (up/down); the file is damaged.")
    up, down = parts["up"], parts["down"]
    if up.dim() == 4 and up.shape[2:] == (1, 1):
        up = up.reshape(up.shape[:2])
    if down.dim() == 4 and down.shape[2:] == (1, 1):
        down = down.reshape(down.shape[:2])
    if up.dim() != 2 or down.dim() != 2 or 0 in up.shape or 0 in down.shape or up.shape[1] != down.shape[0]:
        raise WeightsmithError(
            f"LoRA {name}: {prefix} has up {tuple(up.shape)} and down {tuple(down.shape)}, which are not "
            "2-D factors of one rank; the file is damaged."
        )
    r = int(down.shape[0])
    alpha = None
    if "alpha" in parts:
        a = parts["alpha"]
        if a.numel() == 0:
            raise WeightsmithError(f"LoRA {name}: {prefix}.alpha has no elements; the file is damaged.")
        alpha = float(a.float().reshape(-1)[0])
    scale = (alpha / r) if alpha else 1.0  # alpha 0 is read as alpha = rank, as sd-scripts loads it
    return up.float(), down.float(), scale, alpha, "lora"


def _block_diagonal(up: torch.Tensor, rows: list[int]) -> bool:
    """Whether ``up``'s row blocks ``rows`` use disjoint, equal column blocks (sd-scripts split_qkv)."""
    n = len(rows)
    r = up.shape[1]
    if r % n:
        return False
    rr, i = r // n, 0
    for j, h in enumerate(rows):
        blk = up[i : i + h]
        if bool(blk[:, : j * rr].any()) or bool(blk[:, (j + 1) * rr :].any()):
            return False
        i += h
    return True


def _split_fused(bfl: str, npieces, up, down, prefix, name):
    """Pieces of a fused BFL tensor as [(Piece, up rows, down)] with H from the factors' input width."""
    h = int(down.shape[1])
    rows = up.shape[0]
    if bfl.endswith("linear1") and npieces is None:
        mlp = rows - 3 * h
        if mlp <= 0:
            raise WeightsmithError(
                f"LoRA {name}: {prefix} has {rows} output rows for single-block linear1 of width {h} "
                f"(expected 3×{h} + the MLP width); the file is damaged or not a Flux LoRA."
            )
    else:
        mlp = None
    pieces = bfl_to_diffusers(bfl, h, mlp)[: npieces or None]
    want = sum(p.length for p in pieces)
    if rows != want:
        raise WeightsmithError(
            f"LoRA {name}: {prefix} has {rows} output rows, but {bfl} at width {h} needs {want} "
            f"({' + '.join(p.diffusers.rsplit('.', 1)[-1] for p in pieces)}); the file is damaged or "
            "made for another model."
        )
    lens = [p.length for p in pieces]
    if len(pieces) > 1 and _block_diagonal(up, lens):
        rr = up.shape[1] // len(pieces)
        out, i = [], 0
        for j, p in enumerate(pieces):
            out.append((p, up[i : i + p.length, j * rr : (j + 1) * rr], down[j * rr : (j + 1) * rr]))
            i += p.length
        return out, True
    out, i = [], 0
    for p in pieces:
        out.append((p, up[i : i + p.length], down))
        i += p.length
    return out, False


def read(tensors: dict, name: str = "lora") -> FluxRead:
    """Every module of a Flux LoRA state dict (any layout above, mixed) as canonical exact factors.
    Needs no model: widths come from the factors. Refuses, with a :class:`WeightsmithError`, damaged
    factors, NaN/Inf, module types that are no additive low-rank delta, and a module named twice."""
    groups: dict[str, dict] = {}
    unknown = []
    for k, v in tensors.items():
        s = split_key(k)
        if s is None:
            unknown.append(k)
            continue
        groups.setdefault(s[0], {})[s[1]] = v
    out = FluxRead({})
    split_qkv, sources = [], {}
    for prefix in sorted(groups):
        parts = groups[prefix]
        roles = set(parts) - {"alpha"}
        t = target_of(prefix)
        if t is None:
            out.unmatched.extend(prefix + "." + r for r in sorted(parts))
            continue
        if "refused" in roles:
            raise WeightsmithError(
                f"LoRA {name}: {prefix} is not a plain LoRA (LoCon/LoHa/LoKr/DoRA/OFT or set_weight keys); "
                "Weightsmith reads Flux LoRAs as plain low-rank or full (.diff) deltas. Convert it first."
            )
        if "bias" in roles:
            raise WeightsmithError(
                f"LoRA {name}: {prefix} has a lora_B.bias: this is a BFL control LoRA (Canny/Depth), which "
                "also changes biases, norms and the input width; it is not an additive weight LoRA."
            )
        if "diff_b" in roles:
            out.ignored.append(prefix + ".diff_b")
            roles.discard("diff_b")
            if not roles:
                continue
        for r, v in parts.items():
            if isinstance(v, torch.Tensor):
                _finite(prefix + "." + r, v, name)
        up, down, scale, alpha, kind = _factors(parts, prefix, name)
        out.formats.add(t.fmt)
        if kind == "full":
            out.formats.add("full")
        if t.canonical is not None:
            items = [(t.canonical, up, down)]
        elif t.diffusers is not None:
            items = [(f"{TRANSFORMER}.{t.diffusers}", up, down)]
        else:
            if t.bfl in SWAPPED:
                up = swap_halves(up)
            if len(bfl_to_diffusers(t.bfl, 1)) > 1:
                pcs, cut = _split_fused(t.bfl, t.pieces, up, down, prefix, name)
                if cut:
                    split_qkv.append((prefix, int(down.shape[0]), len(pcs), alpha))
                items = [(f"{TRANSFORMER}.{p.diffusers}", u, d) for p, u, d in pcs]
            else:
                items = [(f"{TRANSFORMER}.{bfl_to_diffusers(t.bfl)[0].diffusers}", up, down)]
        for canon, u, d in items:
            if canon in out.modules:
                raise WeightsmithError(
                    f"LoRA {name} names module {canon} twice ({sources[canon]} and {prefix}); the file is "
                    "ambiguous (ComfyUI and Forge would apply both, diffusers one). Keep one layout."
                )
            sources[canon] = prefix
            # each split piece owns its factors (pieces of one fused tensor share values, not storage)
            out.modules[canon] = FluxModule(canon, u.clone(), d.clone(), float(scale), kind, alpha)
    out.unmatched.extend(unknown)
    if split_qkv:
        p, r, n, a = split_qkv[0]
        out.notes.append(
            f"{len(split_qkv)} fused module(s) have a block-diagonal up factor (e.g. {p}: rank {r} = {n} blocks "
            f"of {r // n}), as sd-scripts saves split_qkv=True LoRAs; read with scale alpha/{r}"
            f"{f' = {a}/{r}' if a else ''}, which is what ComfyUI, Forge and diffusers apply: 1/{n} of the "
            "per-slice scale alpha/(rank/n) the LoRA was trained with (kohya-ss/sd-scripts issue #2204). "
            f"If it looks weak, raise its strength ×{n}."
        )
    return out


def check_shapes(read_: FluxRead, shapes: dict, name: str) -> None:
    """Refuse a LoRA whose modules do not fit a model (``shapes``: canonical name -> weight shape);
    modules the model lacks are refused too (a Flux LoRA for a deeper model)."""
    for canon, m in read_.modules.items():
        want = shapes.get(canon)
        if want is None:
            raise WeightsmithError(
                f"LoRA {name} changes {canon}, which this Flux model does not have (a deeper model or "
                "another variant); use a LoRA made for this model."
            )
        if int(want[0]) != m.shape[0] or math.prod(want[1:]) != m.shape[1]:
            raise WeightsmithError(
                f"LoRA {name} does not fit this Flux model: {canon} is {m.shape[0]}×{m.shape[1]} in the LoRA "
                f"but {want[0]}×{math.prod(want[1:])} in the model. Use a LoRA made for this base model."
            )


# ----------------------------------------------------------------------------------------------
# writing
def write_prefix(canonical: str) -> str | None:
    """The key prefix written for a canonical module (before ``.lora_A.weight``), or None for a T5
    module (no LoRA layout every host loads: see :func:`t5_edited_state`)."""
    if canonical.startswith(T5 + "."):
        return None
    if canonical.startswith((TRANSFORMER + ".", CLIP_L + ".")):
        return canonical
    raise WeightsmithError(f"{canonical} is not a Flux module name (transformer., text_encoder., text_encoder_2.).")


def write_tensors(factors: dict) -> tuple[dict, list[str]]:
    """PEFT tensors (scale baked, no alpha keys) for ``{canonical: (up, down)}`` (ΔW = up @ down) and
    the canonical T5 modules left out (they go into a full T5 file). Every transformer name must be a
    diffusers module (fused BFL layers already split)."""
    out, t5 = {}, []
    for canon in sorted(factors):
        pre = write_prefix(canon)
        if pre is None:
            t5.append(canon)
            continue
        if canon.startswith(TRANSFORMER + "."):
            diffusers_to_bfl(canon[len(TRANSFORMER) + 1 :])  # KeyError: not a Flux linear layer
        up, down = factors[canon]
        out[pre + ".lora_A.weight"] = down.float().contiguous()
        out[pre + ".lora_B.weight"] = up.float().contiguous()
    return out, t5


def t5_edited_state(base, deltas: dict, prefix: str = ""):
    """Stream ``(key, tensor)`` of a T5 encoder state with ``deltas`` (canonical ``text_encoder_2.…``
    name -> ΔW) added, in sorted key order, one tensor at a time. ``base``: a mapping or a lazy reader
    with ``keys()`` and ``get(key)`` (:class:`~weightsmith.core.state_files.StateFile`), HF
    ``T5EncoderModel`` keys after ``prefix`` (e.g. ``text_encoders.t5xxl.transformer.`` in a ComfyUI
    checkpoint). An edited weight keeps the base dtype; where the base holds a ComfyUI ``scale_weight``
    beside it (scaled fp8: effective weight = stored · scale), the stored value becomes
    ``(stored · scale + ΔW) / scale``. Sums are formed in float32, and an edited weight that is not
    finite after the cast back is refused. ``base`` is not modified. Every delta must find its weight
    (checked before anything is yielded)."""
    keys = sorted(base.keys())
    have = set(keys)
    want = {prefix + c[len(T5) + 1 :] + ".weight": c for c in deltas}
    missing = sorted(set(want) - have)
    if missing:
        raise WeightsmithError(
            f"the base T5 weights lack {missing[0]} ({len(missing)} edited weight(s) in all); pass the T5 "
            "encoder the edit was computed on."
        )
    for k in keys:
        t = base.get(k)
        c = want.get(k)
        if c is None:
            yield k, t
            continue
        d = deltas[c]
        if tuple(d.shape) != tuple(t.shape):
            raise WeightsmithError(f"the T5 edit for {c} is {tuple(d.shape)} but the base weight is {tuple(t.shape)}.")
        sk = k[: -len(".weight")] + ".scale_weight"
        scale = base.get(sk).float() if sk in have else None
        new = t.float() + d.float() if scale is None else (t.float() * scale + d.float()) / scale
        new = new.to(t.dtype)
        if not bool(torch.isfinite(new.float()).all()):
            raise WeightsmithError(
                f"the edited T5 weight {k} holds NaN or infinite values in {str(t.dtype).removeprefix('torch.')} "
                "(the edit does not fit the stored type); nothing was written."
            )
        yield k, new


T5_NOTE = (
    "The T5 part of this edit is not in the LoRA: diffusers' FluxPipeline loads LoRAs into the transformer "
    "and CLIP-L only, so it is written as a full T5 encoder file beside it ({file}); load that as the T5 "
    "text encoder (ComfyUI DualCLIPLoader / Forge VAE-text-encoder list / diffusers text_encoder_2)."
)
