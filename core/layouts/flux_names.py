"""Flux.1 linear-layer names: BFL/ComfyUI ↔ diffusers, with the row ranges of the fused tensors.

Data tables and small functions, no tensors held (docs/flux_lora.md, "Names"). BFL names are the
transformer's parameter paths in ``flux1-dev.safetensors`` (ComfyUI adds ``diffusion_model.``);
diffusers names are module paths inside ``FluxTransformer2DModel``. Canonical Weightsmith names are
the diffusers component plus the diffusers path (``transformer.transformer_blocks.0.attn.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` for CLIP-L,
``text_encoder_2.encoder.block.0.layer.0.SelfAttention.q`` for T5).

Fused BFL tensors hold several diffusers modules as row blocks (``H`` = hidden size, ``M`` = MLP
width, 4H in Flux.1):

- ``double_blocks.N.img_attn.qkv``: ``attn.to_q`` [0, H), ``attn.to_k`` [H, 2H), ``attn.to_v`` [2H, 3H)
- ``double_blocks.N.txt_attn.qkv``: ``attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``, same rows
- ``single_blocks.N.linear1``: ``attn.to_q`` / ``to_k`` / ``to_v`` as above, ``proj_mlp`` [3H, 3H+M)

``final_layer.adaLN_modulation.1`` ↔ ``norm_out.linear`` is the one permuted pair: BFL chunks
(shift, scale), diffusers (scale, shift); :func:`swap_halves` converts rows either way (weights,
biases and LoRA up factors alike). Every other pair is a plain rename.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TRANSFORMER = "transformer"
CLIP_L = "text_encoder"
T5 = "text_encoder_2"

# BFL name inside double_blocks.N -> diffusers name inside transformer_blocks.N; a tuple is a fused
# tensor: (diffusers name, first row in units of H, rows in units of H (None: the MLP width M)).
DOUBLE = {
    "img_attn.qkv": (("attn.to_q", 0, 1), ("attn.to_k", 1, 1), ("attn.to_v", 2, 1)),
    "txt_attn.qkv": (("attn.add_q_proj", 0, 1), ("attn.add_k_proj", 1, 1), ("attn.add_v_proj", 2, 1)),
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
}
# BFL name inside single_blocks.N -> diffusers name inside single_transformer_blocks.N
SINGLE = {
    "linear1": (("attn.to_q", 0, 1), ("attn.to_k", 1, 1), ("attn.to_v", 2, 1), ("proj_mlp", 3, None)),
    "linear2": "proj_out",
    "modulation.lin": "norm.linear",
}
# top-level BFL name -> top-level diffusers name
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "final_layer.linear": "proj_out",
}
# the RMS norms' scales (not linear layers): BFL name inside the block -> diffusers parameter inside the block
DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
SWAPPED = frozenset({"final_layer.adaLN_modulation.1"})  # BFL names whose rows are (shift, scale)
SWAPPED_DIFFUSERS = frozenset({"norm_out.linear"})

_DOUBLE_RE = re.compile(r"^double_blocks\.(\d+)\.(.+)$")
_SINGLE_RE = re.compile(r"^single_blocks\.(\d+)\.(.+)$")
_TBLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_SBLOCK_RE = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Piece:
    """One diffusers module inside a BFL tensor: rows ``[start, start + length)`` of the BFL weight
    (``start``/``length`` None: the whole tensor), ``swap``: rows are (shift, scale) ↔ (scale, shift)."""

    diffusers: str  # path inside the transformer
    start: int | None = None
    length: int | None = None
    swap: bool = False

    @property
    def rows(self) -> slice | None:
        return None if self.start is None else slice(self.start, self.start + self.length)


def _pieces(entry, prefix: str, hidden: int, mlp: int | None) -> tuple[Piece, ...]:
    if isinstance(entry, str):
        return (Piece(prefix + entry),)
    m = 4 * hidden if mlp is None else mlp
    return tuple(Piece(prefix + d, a * hidden, m if n is None else n * hidden) for d, a, n in entry)


def bfl_to_diffusers(bfl: str, hidden: int = 3072, mlp: int | None = None) -> tuple[Piece, ...]:
    """The diffusers module(s) a BFL linear layer holds (name without ``.weight``, no
    ``diffusion_model.``). ``hidden``: H; ``mlp``: the MLP width (default 4H). KeyError if ``bfl``
    names no Flux linear layer."""
    m = _DOUBLE_RE.match(bfl)
    if m:
        return _pieces(DOUBLE[m.group(2)], f"transformer_blocks.{m.group(1)}.", hidden, mlp)
    m = _SINGLE_RE.match(bfl)
    if m:
        return _pieces(SINGLE[m.group(2)], f"single_transformer_blocks.{m.group(1)}.", hidden, mlp)
    return (Piece(TOP[bfl], swap=bfl in SWAPPED),)


def _inverse(table: dict) -> dict:
    """diffusers name -> (BFL name, index of the piece in a fused tensor or None)."""
    inv = {}
    for bfl, entry in table.items():
        if isinstance(entry, str):
            inv[entry] = (bfl, None)
        else:
            for i, piece in enumerate(entry):
                inv[piece[0]] = (bfl, i)
    return inv


_INV_DOUBLE = _inverse(DOUBLE)
_INV_SINGLE = _inverse(SINGLE)
_INV_TOP = {v: k for k, v in TOP.items()}
_INV_DOUBLE_NORMS = {v: k for k, v in DOUBLE_NORMS.items()}
_INV_SINGLE_NORMS = {v: k for k, v in SINGLE_NORMS.items()}


def diffusers_to_bfl(diffusers: str, hidden: int = 3072, mlp: int | None = None) -> tuple[str, Piece]:
    """The BFL tensor holding a diffusers linear module, and the :class:`Piece` (its rows there).
    KeyError if ``diffusers`` names no Flux linear layer."""
    for rx, inv, pre in ((_TBLOCK_RE, _INV_DOUBLE, "double_blocks"), (_SBLOCK_RE, _INV_SINGLE, "single_blocks")):
        m = rx.match(diffusers)
        if m:
            bname, idx = inv[m.group(2)]
            bfl = f"{pre}.{m.group(1)}.{bname}"
            if idx is None:
                return bfl, Piece(diffusers)
            return bfl, bfl_to_diffusers(bfl, hidden, mlp)[idx]
    bfl = _INV_TOP[diffusers]
    return bfl, Piece(diffusers, swap=bfl in SWAPPED)


def bfl_param(param: str, hidden: int = 3072, mlp: int | None = None) -> tuple[str, Piece]:
    """The BFL tensor holding a diffusers *parameter* (``….weight``/``….bias`` of a linear, or an RMS
    norm's scale) and the :class:`Piece` (its rows there; a norm's is whole). KeyError where ``param``
    names no Flux transformer parameter."""
    blocks = ((_TBLOCK_RE, _INV_DOUBLE_NORMS, "double_blocks"), (_SBLOCK_RE, _INV_SINGLE_NORMS, "single_blocks"))
    for rx, inv, pre in blocks:
        m = rx.match(param)
        if m and m.group(2) in inv:
            return f"{pre}.{m.group(1)}.{inv[m.group(2)]}", Piece(param)
    module, _, leaf = param.rpartition(".")
    bfl, piece = diffusers_to_bfl(module, hidden, mlp)
    return f"{bfl}.{leaf}", piece


def is_fused(bfl: str) -> bool:
    """Whether a BFL linear layer holds more than one diffusers module."""
    try:
        return len(bfl_to_diffusers(bfl)) > 1
    except KeyError:
        return False


def swap_halves(t):
    """Rows (shift, scale) ↔ (scale, shift) of ``final_layer.adaLN_modulation.1`` / ``norm_out.linear``
    (weights, biases, LoRA up factors); its own inverse."""
    h = t.shape[0] // 2
    import torch

    return torch.cat([t[h:], t[:h]], 0)


def take_piece(t, piece: Piece | None):
    """The rows of a stored (BFL) tensor ``t`` that hold one diffusers module or parameter (``piece``: its
    rows in a fused tensor, halves swapped for ``norm_out``; None: the whole tensor). The inverse of
    :func:`add_piece`."""
    if piece is None:
        return t
    t = t[piece.rows] if piece.rows is not None else t
    return swap_halves(t) if piece.swap else t


def bfl_widths(shape_of, prefix: str = "") -> tuple[int, int | None] | None:
    """``(hidden, MLP width)`` of a BFL-named transformer, from ``shape_of(key)`` (a stored shape, or None
    where there is no such key): ``img_in`` gives H, the first double block's MLP its width (None: 4H).
    None where the transformer has no ``img_in``. What :func:`diffusers_to_bfl` needs to find a module's rows."""
    hidden = shape_of(prefix + "img_in.weight")
    if hidden is None:
        return None
    mlp = shape_of(prefix + "double_blocks.0.img_mlp.0.weight")
    return int(hidden[0]), (int(mlp[0]) if mlp is not None else None)


def add_piece(acc, d, piece: Piece | None):
    """Add one module's ΔW ``d`` into ``acc``, the ΔW of the whole stored (BFL) tensor holding it: at the
    piece's rows where it is fused, halves swapped back where it is ``norm_out``; returns ``acc``."""
    if piece is not None and piece.swap:
        d = swap_halves(d.reshape(acc.shape[0] if piece.rows is None else piece.length, -1))
    if piece is None or piece.rows is None:
        acc += d.reshape(acc.shape)
    else:
        acc[piece.rows] += d.reshape(acc[piece.rows].shape)
    return acc


def bfl_linear_names(num_double: int, num_single: int, guidance: bool = True) -> list[str]:
    """Every BFL linear layer of a Flux transformer with the given depth, in model order."""
    top_in = [k for k in TOP if not k.startswith("final_layer") and (guidance or not k.startswith("guidance_in"))]
    out = list(top_in)
    out += [f"double_blocks.{i}.{k}" for i in range(num_double) for k in DOUBLE]
    out += [f"single_blocks.{i}.{k}" for i in range(num_single) for k in SINGLE]
    out += ["final_layer.adaLN_modulation.1", "final_layer.linear"]
    return out


def diffusers_linear_names(num_double: int, num_single: int, guidance: bool = True) -> list[str]:
    """Every diffusers linear module of a Flux transformer with the given depth (fused BFL layers
    split), in the order of :func:`bfl_linear_names`."""
    return [p.diffusers for b in bfl_linear_names(num_double, num_single, guidance) for p in bfl_to_diffusers(b)]
