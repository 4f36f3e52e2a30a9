"""The in-memory model every solver works on.

An :class:`SDModel` bundles the text encoder(s), their tokenizers, the denoiser (possibly built
lazily from a single-file checkpoint) and how the denoiser's conditioning is read from the encoders.
What differs between families is declared by the family's module (:mod:`.families`, docs/method.md,
"Model families"): which hidden state each encoder gives (:class:`EncoderSpec`), how the parts are
put together (``Family.build_conditioning``), the denoiser's layout. For the SD families:

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

from . import families
from .errors import WeightsmithError
from .families.base import Conditioning, EncoderSpec, Family
from .families.sd_common import unet_cross_attention_names
from .naming import TE1, UNET

FAMILIES = tuple(sorted(families.names()))

__all__ = ["FAMILIES", "Conditioning", "EncoderSpec", "SDModel", "default_encoder_specs", "detect_family"]


def detect_family(te_configs: list, unet_config=None) -> str:
    """Family from the components (docs/method.md, "Model families"): two encoders -> sdxl; one
    OpenCLIP-style (gelu) -> sd2; one CLIP-style (quick_gelu) -> sd1. Raises if the denoiser's
    context width disagrees."""
    return families.detect_from_components(te_configs, unet_config)


def default_encoder_specs(
    family: str, num_layers: dict[str, int], from_diffusers: bool, clip_skip: int | None = None
) -> dict[str, EncoderSpec]:
    """Family defaults. ``clip_skip`` follows A1111/ComfyUI: 1 = the family's default layer,
    2 = one layer earlier, ... (applies to SD1/SD2; SDXL always uses the penultimate layer)."""
    return families.get(family).encoder_specs(num_layers, from_diffusers, clip_skip)


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
    def family_def(self) -> Family:
        """The family's declarations (:mod:`.families`)."""
        return families.get(self.family)

    @property
    def layout(self):
        """The denoiser's block structure key maps need (SD: a ``UNetLayout``)."""
        return self.family_def.denoiser_layout(self.unet_config)

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
        return unet_cross_attention_names(self.unet_config)

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
        """The denoiser's conditioning from the hidden state it reads: the final norm applied where
        the family does (``encoder_specs[comp].final_ln``)."""
        spec = self.encoder_specs[comp]
        if spec.final_ln:
            with torch.no_grad():
                h = _te_submodule(self.text_encoders[comp], spec.norm_path)(h)
        return h

    def build_conditioning(self, contexts: dict, pooled: dict | None = None) -> Conditioning:
        """The family's conditioning from per-encoder parts (token states of the encoders whose
        spec gives tokens; pooled vectors of those whose spec gives one)."""
        return self.family_def.build_conditioning(contexts, pooled or {})

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The conditioning the denoiser sees for these prompts (float32)."""
        ctx, pooled = {}, {}
        for comp in self.text_encoders:
            spec = self.encoder_specs[comp]
            out = self.encoder_outputs(comp, self.tokenize(prompts, comp))
            if spec.tokens:
                ctx[comp] = self.conditioning_from_outputs(comp, out).float()
            if spec.pooled:
                pooled[comp] = out.text_embeds.float() if hasattr(out, "text_embeds") else out.pooler_output.float()
        return self.build_conditioning(ctx, pooled)

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
