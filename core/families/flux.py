"""Flux.1 (dev, schnell) as data: its components and its erasure stages (docs/flux.md).

Erasure stages, shallow → deep (docs/flux.md, "Erasure on Flux"):

- :data:`T5_STAGE` (``erasepro`` only): T5's blocks one after the other; each block's linears grouped
  by the input they share (the self-attention's ``q``/``k``/``v`` read the block's first RMS-normed
  state, ``o`` the attention mix, ``wi_0``/``wi_1`` the second normed state, ``wo`` the gated product).
  The option words are ErasePro's ``--te-sublayers`` (``k_proj,v_proj`` by default), so one option
  selects the same roles in CLIP and in T5.
- :data:`CONDITIONING_STAGES` (every method's final stage): the transformer's two text-only
  projections, ``context_embedder`` (BFL ``txt_in``; input: every T5 token) and
  ``time_text_embed.text_embedder.linear_1`` (``vector_in.in_layer``; input: CLIP-L's pooled vector).
  Nothing deeper in the transformer sees text alone (docs/flux.md, "Erasure on Flux").

:data:`FAMILY` is the registered :class:`~.base.Family` (docs/method.md, "Model families"): keys
recognised as :func:`~weightsmith.core.layouts.flux.transformer_layout` does (BFL file, ComfyUI all-in-one,
diffusers transformer), conditioning T5 tokens + CLIP-L pooled, the checkpoint layout of
:mod:`~weightsmith.core.layouts.flux`, the LoRA layout of :mod:`~weightsmith.core.layouts.flux_lora`, and the
rectified-flow sampler (Euler on the shifted schedule, docs/flux.md, "Sampling"; the denoiser call is
:func:`~weightsmith.core.flux_sampling.predict`).
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import WeightsmithError
from ..layouts import flux_lora
from ..layouts.flux import CLIP_L, COMFY_MODEL_PREFIX, COMFY_TE_PREFIX, T5, TEXT_INPUTS, TRANSFORMER, transformer_layout
from ..layouts.flux_names import diffusers_to_bfl
from .base import (
    DENOISER,
    TEXT_ENCODER,
    CheckpointLayout,
    CheckpointSlot,
    Component,
    Conditioning,
    ConditioningStage,
    DenoiserStats,
    EncoderSpec,
    EncoderStage,
    EraseLayout,
    Family,
    LoraLayout,
    Sampler,
)

NAME = "flux"
LABEL = "Flux.1"

COMPONENTS = (
    Component(TRANSFORMER, DENOISER, "flux-transformer"),
    Component(CLIP_L, TEXT_ENCODER, "clip", tokenizer="tokenizer", pad_token="<|endoftext|>", max_length=77),
    Component(T5, TEXT_ENCODER, "t5", tokenizer="tokenizer_2", pad_token="<pad>", max_length=256),
)

T5_STAGE = EncoderStage(
    component=T5,
    layers="encoder.block",
    groups=(
        (
            ("q_proj", "layer.0.SelfAttention.q"),
            ("k_proj", "layer.0.SelfAttention.k"),
            ("v_proj", "layer.0.SelfAttention.v"),
        ),
        (("out_proj", "layer.0.SelfAttention.o"),),
        (("fc1", "layer.1.DenseReluDense.wi_0"), ("fc1", "layer.1.DenseReluDense.wi_1")),
        (("fc2", "layer.1.DenseReluDense.wo"),),
    ),
    canonical_layers="encoder.block",
)

CONTEXT_EMBEDDER = f"{TRANSFORMER}.context_embedder"
POOLED_EMBEDDER = f"{TRANSFORMER}.time_text_embed.text_embedder.linear_1"
assert {CONTEXT_EMBEDDER, POOLED_EMBEDDER} == {f"{TRANSFORMER}.{m}" for m in TEXT_INPUTS}

CONDITIONING_STAGES = (
    ConditioningStage("txt_in", "context", lambda model, sublayers=None: [CONTEXT_EMBEDDER]),
    ConditioningStage("vector_in", "pooled", lambda model, sublayers=None: [POOLED_EMBEDDER]),
)


def encoder_stages(model) -> tuple[EncoderStage, ...]:
    """ErasePro's progressive stages for ``model``: T5 when the model has it (CLIP-L's pooled vector
    feeds only ``vector_in``, whose stage edits it directly)."""
    return (T5_STAGE,) if T5 in getattr(model, "text_encoders", {T5: None}) else ()


ERASE = EraseLayout(encoder_stages=encoder_stages, conditioning_stages=CONDITIONING_STAGES)


def stage_linears(stage: EncoderStage, layer: int, sublayers) -> list[tuple[tuple[str, str], ...]]:
    """The groups of ``stage`` at ``layer`` restricted to the ``--te-sublayers`` words given, each entry
    (canonical name, path inside the layer); empty groups dropped."""
    out = []
    for g in stage.groups:
        sel = tuple(
            (f"{stage.component}.{stage.canonical_layers}.{layer}.{path}", path)
            for word, path in g
            if word in sublayers
        )
        if sel:
            out.append(sel)
    return out


# ----------------------------------------------------------------------------------------------
# recognition and conditioning
def recognise_keys(keys) -> bool:
    """A BFL transformer file, a ComfyUI all-in-one checkpoint or diffusers transformer weights."""
    return transformer_layout(keys) is not None


def recognise_components(te_configs, denoiser_config=None) -> bool:
    """Loaded components with a T5 encoder (Flux's only T5-conditioned family here)."""
    return any(getattr(c, "model_type", None) == "t5" for c in te_configs)


def check_components(te_configs, denoiser_config=None) -> None:
    """Widths are checked where the Flux loader pairs encoders and transformer (:mod:`..flux_io`)."""


def encoder_specs(num_layers=None, from_diffusers=False, clip_skip=None) -> dict:
    """T5's last hidden state through its final RMS norm gives the tokens; CLIP-L gives only its
    pooled output (no clip skip: docs/flux.md)."""
    if clip_skip is not None:
        raise WeightsmithError("--clip-skip applies to SD1.x/SD2.x; Flux reads CLIP-L's pooled output.")
    return {
        CLIP_L: EncoderSpec(layer=-1, final_ln=True, tokens=False, pooled=True),
        T5: EncoderSpec(layer=-1, final_ln=True, tokens=True, pooled=False, norm_path="encoder.final_layer_norm"),
    }


def build_conditioning(contexts: dict, pooled: dict) -> Conditioning:
    """Flux's conditioning: T5's tokens alone as the context, CLIP-L's pooled vector as ``pooled``."""
    return Conditioning(contexts[T5], (pooled or {}).get(CLIP_L))


# ----------------------------------------------------------------------------------------------
# checkpoint layout
def _te_prefix(component: str) -> tuple[str, bool]:
    return COMFY_TE_PREFIX[component], False


def _split_param(canonical_param: str) -> tuple[str, str, str]:
    comp, _, rest = canonical_param.partition(".")
    module, _, kind = rest.rpartition(".")
    return comp, module, kind


def slot(canonical_param: str, layout="bfl", te_hidden=None) -> CheckpointSlot:
    """Where a canonical parameter lives in a ComfyUI all-in-one checkpoint (``layout``: ``"bfl"``; a
    BFL file is the same without the ``model.diffusion_model.`` prefix): transformer modules at their
    BFL tensor (rows of a fused ``qkv``/``linear1``), text encoders under ComfyUI's prefixes."""
    comp, module, kind = _split_param(canonical_param)
    if comp == TRANSFORMER:
        bfl, piece = diffusers_to_bfl(module, **({"hidden": te_hidden} if te_hidden else {}))
        rows = None if piece.rows is None else (piece.rows.start, piece.rows.stop)
        return CheckpointSlot(f"{COMFY_MODEL_PREFIX}{bfl}.{kind}", rows)
    if comp == CLIP_L:
        return CheckpointSlot(COMFY_TE_PREFIX[CLIP_L] + module + "." + kind)
    if comp == T5:
        return CheckpointSlot(COMFY_TE_PREFIX[T5] + module + "." + kind)
    raise WeightsmithError(
        f"{canonical_param} is not a Flux parameter name (transformer., text_encoder., text_encoder_2.)."
    )


def comfy_key(canonical_param: str, layout="bfl") -> str:
    """ComfyUI's in-memory key of a canonical parameter (``diffusion_model.<BFL>``; for a fused tensor the
    whole tensor's key)."""
    comp, module, kind = _split_param(canonical_param)
    if comp == TRANSFORMER:
        return f"diffusion_model.{diffusers_to_bfl(module)[0]}.{kind}"
    return slot(canonical_param, layout).key.removeprefix("text_encoders.")


CHECKPOINT = CheckpointLayout(
    denoiser_prefix=COMFY_MODEL_PREFIX,
    te_prefix=_te_prefix,
    slot=slot,
    comfy_denoiser_prefix="diffusion_model.",
    comfy_te_attrs={CLIP_L: "clip_l", T5: "t5xxl"},
    comfy_key=comfy_key,
    folders={TRANSFORMER: TRANSFORMER, CLIP_L: CLIP_L, T5: T5},
)


# ----------------------------------------------------------------------------------------------
# LoRA layout (docs/flux_lora.md): reading and writing are :mod:`..layouts.flux_lora`'s
def _resolves_to(prefix: str, canonical: str) -> bool:
    t = flux_lora.target_of(prefix)
    if t is None:
        return False
    if t.canonical is not None:
        return t.canonical == canonical
    if t.diffusers is not None:
        return f"{TRANSFORMER}.{t.diffusers}" == canonical
    if t.bfl is not None and canonical.startswith(TRANSFORMER + "."):
        try:
            bfl, piece = diffusers_to_bfl(canonical[len(TRANSFORMER) + 1 :])
        except KeyError:
            return False
        return t.bfl == bfl and piece.rows is None and t.pieces is None
    return False


def read_prefixes(canonical: str, layout=None) -> list[str]:
    """Prefixes a LoRA may name ``canonical`` with, each checked against the reader's own parser
    (:func:`~weightsmith.core.layouts.flux_lora.target_of`); a piece of a fused BFL tensor is read from
    the fused key by :func:`~weightsmith.core.layouts.flux_lora.read`, not through a prefix."""
    comp, _, path = canonical.partition(".")
    us = path.replace(".", "_")
    cands = [canonical]
    if comp == TRANSFORMER:
        cands += [f"lora_transformer_{us}"]
        try:
            bfl, piece = diffusers_to_bfl(path)
        except KeyError:
            bfl, piece = None, None
        if bfl is not None and piece.rows is None:
            cands += [f"lora_unet_{bfl.replace('.', '_')}", f"diffusion_model.{bfl}", bfl]
    elif comp == CLIP_L:
        cands += [f"lora_te1_{us}", f"lora_te_{us}", f"text_encoders.clip_l.transformer.{path}"]
    elif comp == T5:
        cands += [f"lora_te2_{us}", f"text_encoders.t5xxl.transformer.{path}"]
    return [p for p in dict.fromkeys(cands) if _resolves_to(p, canonical)]


def _key_hint(prefixes) -> bool:
    return flux_lora.looks_like_flux([p + ".lora_down.weight" for p in prefixes])


def _foreign(prefixes) -> str | None:
    sd = ("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block", "lora_unet_input_blocks")
    if any(p.startswith(sd) or p.startswith("unet.") for p in prefixes):
        return "has Stable Diffusion UNet keys"
    return None


LORA = LoraLayout(
    write_prefix=lambda canonical, layout=None: flux_lora.write_prefix(canonical),
    read_prefixes=read_prefixes,
    base_model_version=flux_lora.BASE_MODEL_VERSION,
    metadata_hint=lambda v: "flux" in v,
    key_hint=_key_hint,
    foreign=_foreign,
)


# ----------------------------------------------------------------------------------------------
# sampler: rectified flow, Euler on the shifted schedule (docs/flux.md, "Sampling")
LATENT_CHANNELS = 16
DEV_MU = 1.15  # the shift ComfyUI (default) and Forge use: 4096 image tokens (1024×1024)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """``t' = e^μ / (e^μ + (1/t − 1))`` (t = 0 stays 0)."""
    t = t.to(torch.float64)
    out = torch.zeros_like(t)
    nz = t > 0
    out[nz] = math.exp(mu) / (math.exp(mu) + (1.0 / t[nz] - 1.0))
    return out


class FlowSchedule:
    """:class:`~.base.Schedule` of ``steps`` Euler steps from t = 1 to 0: dev shifted with μ = 1.15,
    schnell unshifted. ``x_t = (1 − t) x₀ + t ε``; the denoiser predicts the velocity ``v`` and
    ``x ← x + (t_next − t) v``."""

    def __init__(self, model, steps: int):
        steps = max(1, int(steps))
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        shifted = getattr(model, "variant", "dev") == "dev"
        self.ts = time_shift(DEV_MU, grid) if shifted else grid
        self.timesteps = self.ts[:-1].float()

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def model_input(self, x: torch.Tensor, t) -> torch.Tensor:
        return x

    def step(self, pred: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        i = int(torch.argmin((self.ts[:-1] - float(t)).abs()))
        return x + float(self.ts[i + 1] - self.ts[i]) * pred


def latent_shape(model, latent_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of one sample's noise: the transformer's latent channels (``in_channels / 4``: 2×2 patches are
    packed into tokens), an even side (default 128: 1024 px)."""
    side = max(2, int(latent_size or 128))
    side += side % 2
    return int(getattr(model, "latent_channels", LATENT_CHANNELS)), side, side


def predict(model, denoiser, x, t, context, pooled=None):
    """The transformer's velocity at ``(x, t)``: :func:`weightsmith.core.flux_sampling.predict`."""
    from ..flux_sampling import predict as run

    return run(model, denoiser, x, t, context, pooled)


def depth_stage(name: str) -> tuple:
    """The transformer's input layers with the double blocks, then the single blocks, then the output
    layers."""
    if name.startswith("transformer.single_transformer_blocks."):
        return (3,)
    return (4,) if name.startswith(("transformer.norm_out", "transformer.proj_out")) else (2,)


def rows(name: str, levels: int, latent: int, tokens: int) -> int:
    """Image tokens (the latent packed 2 × 2) plus text tokens: an upper bound for every module."""
    return max(1, latent // 2) ** 2 + tokens


STATS = DenoiserStats(
    "transformer.",
    depth_stage,
    rows,
    shared_inputs=(
        # the image stream's q/k/v (and, in a single block, its MLP input), the text stream's q/k/v
        (re.compile(r"^(transformer\.transformer_blocks\.\d+\.attn)\.to_(q|k|v)$"), r"\1.qkv"),
        (re.compile(r"^(transformer\.transformer_blocks\.\d+\.attn)\.add_(q|k|v)_proj$"), r"\1.add_qkv"),
        (
            re.compile(r"^(transformer\.single_transformer_blocks\.\d+)\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)$"),
            r"\1.in",
        ),
    ),
)

SAMPLER = Sampler("rectified-flow", FlowSchedule, latent_shape, predict, STATS)


FAMILY = Family(
    name=NAME,
    label=LABEL,
    priority=3,  # Flux keys and SD keys never overlap: the order does not matter
    components=COMPONENTS,
    recognise_keys=recognise_keys,
    recognise_components=recognise_components,
    check_components=check_components,
    encoder_specs=encoder_specs,
    build_conditioning=build_conditioning,
    denoiser_layout=lambda config=None: None,  # Flux's key maps are by name (layouts.flux_names)
    checkpoint=CHECKPOINT,
    lora=LORA,
    erase=ERASE,
    sampler=SAMPLER,
    listed=1,  # after the SD families in what users read
)
