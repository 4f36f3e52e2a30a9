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

The :class:`~.base.Family` value itself (LoRA layouts, sampler) is assembled where those pieces live;
this module declares what the Flux model I/O and the erasure need.
"""

from __future__ import annotations

from ..layouts.flux import CLIP_L, T5, TEXT_INPUTS, TRANSFORMER
from .base import DENOISER, TEXT_ENCODER, Component, ConditioningStage, EncoderStage, EraseLayout

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
