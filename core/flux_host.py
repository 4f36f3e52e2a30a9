"""Flux.1 in a host's key space: ComfyUI's and Forge's model patchers (docs/flux.md, "Flux in ComfyUI and Forge").

Both hosts hold a loaded Flux model as ComfyUI-style patchers with the same state-dict keys:
the transformer under ``diffusion_model.<BFL name>`` (``double_blocks.N.img_attn.qkv``, ``txt_in``, …),
CLIP-L under ``clip_l.transformer.text_model.…`` and T5-XXL under ``t5xxl.transformer.encoder.…``
(HF names after the prefix). This module is the one place that knows that layout:

- :func:`model_from_host_state` builds a :class:`~.fluxmodel.FluxModel` over a host's weights (a lazy
  reader with ``keys()``/``get()``/``shape()``: nothing is copied until a solver reads a weight; T5 is
  still run one block at a time);
- :func:`host_patches` turns an :class:`~.edit.Edit` (canonical diffusers names) into ``("diff", (ΔW,))``
  patches on the host's keys: a module inside a fused BFL tensor (``qkv``, ``linear1``) becomes its row
  range of a full-size ΔW (:mod:`.layouts.flux_names`), ``norm_out.linear`` is row-swapped;
- :func:`t5_base` gives the base T5 weights a Flux LoRA's T5 part is written into (docs/flux_lora.md).
"""

from __future__ import annotations

import torch

from .errors import WeightsmithError, require
from .fluxmodel import FluxModel, Part
from .layouts.flux import text_encoders_in, transformer_layout, variant
from .layouts.flux_names import CLIP_L, T5, TRANSFORMER, add_piece, bfl_widths, diffusers_to_bfl
from .tokenizer import T5_LENGTH

#: the host's key prefixes (ComfyUI and Forge alike)
DENOISER_PREFIX = "diffusion_model."
TE_PREFIX = {CLIP_L: "clip_l.transformer.", T5: "t5xxl.transformer."}


def is_flux_state(keys) -> bool:
    """Whether a host's denoiser keys are a Flux transformer's (``diffusion_model.double_blocks…``)."""
    lay = transformer_layout(keys)
    return lay is not None and lay[0] == "bfl"


def model_from_host_state(
    state, *, where: str = "the host's model", clip_tokenizer_dirs=(), t5_length: int = T5_LENGTH, heads=None
) -> FluxModel:
    """A FluxModel reading a host's weights: ``state`` has ``keys()``, ``get(key)`` (a tensor, any dtype)
    and ``shape(key)``, with the transformer under ``diffusion_model.`` and the text encoders under
    ``clip_l.transformer.`` / ``t5xxl.transformer.``. ``where`` names the source in messages."""
    from .flux_io import assemble

    keys = list(state.keys())
    lay = transformer_layout(keys)
    require(
        lay is not None and lay[0] == "bfl",
        f"{where} holds no Flux transformer (no diffusion_model.double_blocks.* / img_in weights).",
    )
    parts = {TRANSFORMER: Part(state, lay[1], "bfl", where, "host")}
    for comp, prefix in text_encoders_in(keys).items():
        if prefix.startswith(TE_PREFIX[comp]):
            parts[comp] = Part(state, prefix, "hf", where, "host")
    var = variant(keys, "bfl", lay[1])
    return assemble(parts, var, clip_tokenizer_dirs=clip_tokenizer_dirs, t5_length=t5_length, heads=heads)


def host_key(canonical: str, hidden: int, mlp: int | None = None):
    """``(host key, Piece or None)`` of a canonical Flux module: the transformer's modules map to their
    BFL tensor (a :class:`~.layouts.flux_names.Piece` gives the rows where it is fused), the text
    encoders' keep their HF path under the host's prefix."""
    comp, _, path = canonical.partition(".")
    if comp == TRANSFORMER:
        try:
            bfl, piece = diffusers_to_bfl(path, hidden, mlp)
        except KeyError:
            raise WeightsmithError(
                f"the edit names {canonical}, which is no linear layer of the Flux transformer; it was not "
                "computed on a Flux model. Nothing was changed."
            ) from None
        return DENOISER_PREFIX + bfl + ".weight", piece
    if comp in TE_PREFIX:
        return TE_PREFIX[comp] + path + ".weight", None
    raise WeightsmithError(f"{canonical} is not a Flux module name (transformer., text_encoder., text_encoder_2.).")


def host_patches(edit, shapes: dict) -> tuple[dict, dict]:
    """The edit as ``{host key: ("diff", (ΔW,))}`` patches, ``(transformer patches, text-encoder patches)``.
    ``shapes``: host key -> parameter shape of the loaded model (every edited key must be there, with the
    size the edit has). Pieces of one fused tensor are summed into one full-size ΔW, zero elsewhere."""
    require(edit.family == "flux", f"internal: host_patches takes a Flux edit, not {edit.family}.")
    widths = bfl_widths(shapes.get, DENOISER_PREFIX)
    require(widths is not None, "the loaded model is not a Flux transformer (no diffusion_model.img_in.weight).")
    hidden, mlp = widths
    full: dict[str, torch.Tensor] = {}
    for name in sorted(edit.deltas):
        key, piece = host_key(name, hidden, mlp)
        shape = shapes.get(key)
        d = edit.deltas[name].detach().float().cpu()
        rows = None if piece is None else piece.rows
        want = None if shape is None else ((piece.length, shape[1]) if rows is not None else tuple(shape))
        if shape is None or d.numel() != torch.Size(want).numel():
            raise WeightsmithError(
                f"the edit changes {name} ({key}), which the loaded model "
                f"{'does not have' if shape is None else f'holds as {tuple(want)}, not {tuple(d.shape)}'}: "
                "it was computed for another model. Nothing was changed; compute it again on this one."
            )
        add_piece(full.setdefault(key, torch.zeros(tuple(shape))), d.reshape(want), piece)
    den, te = {}, {}
    for key in sorted(full):
        (den if key.startswith(DENOISER_PREFIX) else te)[key] = ("diff", (full[key].contiguous(),))
    return den, te


class _T5View:
    """The T5 keys of a host state under bare HF names (what a T5 encoder file holds), each tensor in
    the dtype the host stores it in (``state.dtype(key)`` where the state knows it)."""

    def __init__(self, state, prefix: str):
        self.state, self.prefix = state, prefix
        self._keys = [k[len(prefix) :] for k in state.keys() if k.startswith(prefix)]

    def keys(self):
        return list(self._keys)

    def get(self, key):
        t = self.state.get(self.prefix + key)
        dt = getattr(self.state, "dtype", None)
        return t if dt is None else t.to(dt(self.prefix + key))


def t5_base(model: FluxModel):
    """``(base, prefix)`` of the model's base T5 weights, as :func:`~.lora_write.save_lora` takes them
    (``t5_base``, ``t5_prefix``) for an edit that changes T5; ``(None, "")`` without T5. A host's T5
    comes under bare HF names (the T5 file written beside the LoRA loads in DualCLIPLoader and Forge)."""
    p = model.parts.get(T5)
    if p is None:
        return None, ""
    if p.container == "host":
        return _T5View(p.state, p.prefix), ""
    return p.state, p.prefix
