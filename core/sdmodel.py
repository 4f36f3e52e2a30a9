"""The in-memory Stable Diffusion model every solver works on.

An :class:`SDModel` bundles the text encoder(s), their tokenizers, the UNet (possibly built lazily
from a single-file checkpoint) and how the UNet's conditioning is read from the encoders for the
family (docs/method.md, "Model families"):

- ``sd1``: CLIP-L, last layer (or the clip-skip layer) through the final LayerNorm, context 768.
- ``sd2``: OpenCLIP-H, penultimate layer through the final LayerNorm, context 1024.
- ``sdxl``: CLIP-L and OpenCLIP-bigG penultimate layers without final LayerNorm, concatenated to
  2048; the pooled, projected bigG EOS output is the second conditioning input.

The family is recognised from components and key layout (:func:`detect_family`), never from
hard-coded widths, so small test models and fine-tunes of any width work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import WeightsmithError
from .naming import TE1, TE2, UNET, UNetLayout

FAMILIES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class EncoderSpec:
    """Which hidden state of an encoder conditions the UNet."""

    layer: int = -1  # index into hidden_states (-1: last layer, -2: penultimate)
    final_ln: bool = True  # apply the encoder's final LayerNorm to it


@dataclass
class Conditioning:
    context: torch.Tensor  # [B, T, context_dim]
    pooled: torch.Tensor | None = None  # [B, proj] (SDXL)


def detect_family(te_configs: list, unet_config=None) -> str:
    """Family from the components: two encoders -> sdxl; one OpenCLIP-style (gelu) -> sd2;
    one CLIP-style (quick_gelu) -> sd1. Raises if the UNet context width disagrees."""
    if len(te_configs) == 2:
        fam = "sdxl"
    elif len(te_configs) == 1:
        act = getattr(te_configs[0], "hidden_act", "quick_gelu")
        fam = "sd2" if act == "gelu" else "sd1"
    else:
        raise WeightsmithError(
            f"unknown model family: found {len(te_configs)} text encoders; Stable Diffusion 1.x/2.x "
            "have one and SDXL has two. Pass an SD1.x, SD2.x or SDXL model."
        )
    if unet_config is not None:
        ctx = (
            unet_config.get("cross_attention_dim")
            if isinstance(unet_config, dict)
            else getattr(unet_config, "cross_attention_dim", None)
        )
        if isinstance(ctx, (list, tuple)):
            ctx = ctx[0]
        width = sum(c.hidden_size for c in te_configs)
        if ctx is not None and ctx != width:
            raise WeightsmithError(
                f"unknown model family: the UNet expects {ctx}-wide conditioning but the text "
                f"encoder(s) give {width}. The model's components do not belong together."
            )
    return fam


def default_encoder_specs(
    family: str, num_layers: dict[str, int], from_diffusers: bool, clip_skip: int | None = None
) -> dict[str, EncoderSpec]:
    """Family defaults. ``clip_skip`` follows A1111/ComfyUI: 1 = the family's default layer,
    2 = one layer earlier, ... (applies to SD1/SD2; SDXL always uses the penultimate layer)."""
    if clip_skip is not None and (isinstance(clip_skip, bool) or int(clip_skip) != clip_skip or clip_skip < 1):
        raise WeightsmithError(
            f"clip-skip must be a whole number from 1 (the family's default layer) up, got {clip_skip!r}."
        )
    skip = max(1, int(clip_skip or 1)) - 1
    if family == "sdxl":
        if clip_skip not in (None, 1, 2):
            raise WeightsmithError("clip-skip is fixed to the penultimate layer for SDXL; omit it.")
        return {TE1: EncoderSpec(-2, False), TE2: EncoderSpec(-2, False)}
    base = -1
    if family == "sd2" and not from_diffusers:
        base = -2  # single-file OpenCLIP-H keeps all 24 layers; diffusers ships 23
    layer = base - skip
    if -layer > num_layers[TE1]:
        raise WeightsmithError(
            f"clip-skip {clip_skip} is too deep for a {num_layers[TE1]}-layer text encoder; use a "
            f"value from 1 to {num_layers[TE1] + base + 1}."
        )
    return {TE1: EncoderSpec(layer, True)}


def _te_submodule(te: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        return te.get_submodule(path)
    except AttributeError:
        if path.startswith("text_model."):
            return te.get_submodule(path[len("text_model.") :])
        if path == "text_model":
            return te
        raise


@dataclass
class SDModel:
    family: str
    text_encoders: dict[str, torch.nn.Module]
    tokenizers: dict[str, object]
    encoder_specs: dict[str, EncoderSpec]
    unet_config: dict
    unet_loader: Callable[[], torch.nn.Module] | None = None
    unet_weight_reader: Callable[[str], torch.Tensor] | None = None
    scheduler: object | None = None
    source: object | None = None  # model_io.ModelSource
    _unet: torch.nn.Module | None = field(default=None, repr=False)

    # -- components -------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        if self._unet is None:
            if self.unet_loader is None:
                raise WeightsmithError("this model has no UNet")
            self._unet = self.unet_loader()
        return self._unet

    @property
    def loaded_unet(self) -> torch.nn.Module | None:
        """The UNet if it has been built, else None (never builds it)."""
        return self._unet

    def with_unet(self, unet: torch.nn.Module) -> SDModel:
        """A shallow copy of this model whose UNet is ``unet`` (weights read from it, not the file)."""
        import copy

        new = copy.copy(self)
        new._unet = unet
        new.unet_loader = lambda: unet
        new.unet_weight_reader = None
        return new

    @property
    def layout(self) -> UNetLayout:
        return UNetLayout.from_config(self.unet_config)

    @property
    def context_dim(self) -> int:
        return sum(te.config.hidden_size for te in self.text_encoders.values())

    def module(self, canonical: str) -> torch.nn.Module:
        comp, _, path = canonical.partition(".")
        if comp == UNET:
            return self.unet.get_submodule(path)
        return _te_submodule(self.text_encoders[comp], path)

    def weight(self, canonical: str) -> torch.Tensor:
        """The weight of a canonical module (without building a lazy UNet when avoidable)."""
        comp, _, path = canonical.partition(".")
        if comp == UNET and self._unet is None and self.unet_weight_reader is not None:
            return self.unet_weight_reader(path + ".weight")
        return self.module(canonical).weight.detach()

    def unet_cross_attention_names(self) -> list[str]:
        """Canonical names of every UNet cross-attention (``attn2``) block, shallow to deep."""
        names = []
        layout = self.layout
        lpb = layout.layers_per_block
        depths = self._transformer_depths()
        for i, has in enumerate(layout.down_has_attn):
            if has:
                for j in range(lpb):
                    for k in range(depths[("down", i)]):
                        names.append(f"unet.down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2")
        if layout.mid_has_attn:
            for k in range(depths[("mid", 0)]):
                names.append(f"unet.mid_block.attentions.0.transformer_blocks.{k}.attn2")
        for i, has in enumerate(layout.up_has_attn):
            if has:
                for j in range(lpb + 1):
                    for k in range(depths[("up", i)]):
                        names.append(f"unet.up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2")
        return names

    def _transformer_depths(self) -> dict:
        tl = self.unet_config.get("transformer_layers_per_block", 1)
        n = len(self.unet_config["down_block_types"])
        tl = [tl] * n if isinstance(tl, int) else list(tl)
        rev = self.unet_config.get("reverse_transformer_layers_per_block")
        up = list(rev) if rev else list(reversed(tl))
        up = [u if isinstance(u, int) else u[0] for u in up]
        d = {("down", i): tl[i] for i in range(n)}
        d.update({("up", i): up[i] for i in range(n)})
        d[("mid", 0)] = tl[-1]
        return d

    # -- text -------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str], comp: str = TE1) -> torch.Tensor:
        tok = self.tokenizers[comp]
        out = tok(
            list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        )
        return out.input_ids

    def encoder_outputs(self, comp: str, ids: torch.Tensor):
        te = self.text_encoders[comp]
        return te(input_ids=ids.to(te.device), output_hidden_states=True)

    def conditioning_from_outputs(self, comp: str, out) -> torch.Tensor:
        return self.conditioning_from_hidden(comp, out.hidden_states[self.encoder_specs[comp].layer])

    def conditioning_from_hidden(self, comp: str, h: torch.Tensor) -> torch.Tensor:
        """The UNet's conditioning from the hidden state it reads: the final LayerNorm applied where
        the family does (``encoder_specs[comp].final_ln``)."""
        if self.encoder_specs[comp].final_ln:
            with torch.no_grad():
                h = _te_submodule(self.text_encoders[comp], "text_model.final_layer_norm")(h)
        return h

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The conditioning the UNet sees for these prompts (float32)."""
        ctx, pooled = [], None
        for comp in self.text_encoders:
            out = self.encoder_outputs(comp, self.tokenize(prompts, comp))
            ctx.append(self.conditioning_from_outputs(comp, out).float())
            if self.family == "sdxl" and comp == TE2:
                pooled = out.text_embeds.float() if hasattr(out, "text_embeds") else out.pooler_output.float()
        return Conditioning(torch.cat(ctx, dim=-1), pooled)

    def check_prompt_length(self, prompts: list[str], warn: Callable[[str], None]) -> None:
        """Warn (not fail) when a prompt is longer than the encoder's context and gets truncated
        (every encoder of a family tokenizes the same words, so the first tokenizer decides)."""
        comp, tok = next(iter(self.tokenizers.items()))
        limit = tok.model_max_length
        for p in prompts:
            n = len(tok(p, truncation=False).input_ids)
            if n > limit:
                warn(
                    f"prompt is {n} tokens, longer than the {limit}-token context of {comp}; "
                    f"it was truncated: {p[:60]!r}..."
                )
