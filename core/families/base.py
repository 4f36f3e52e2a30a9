"""What a model family declares (docs/method.md, "Model families").

A family is one module in :mod:`weightsmith.core.families` holding one :class:`Family` value named
``FAMILY``: data and small functions, no solver code. Solvers (erasure, merging) and the model I/O
ask the family object and never compare a family's name. The pieces, each its own small dataclass:

- :class:`Component`: the model's parts (the denoiser, each text encoder with its tokenizer),
  named by their diffusers component name, which is also the first part of every *canonical*
  module name (``unet.…``, ``transformer.…``, ``text_encoder.text_model.…``, ``text_encoder_2.…``).
- :class:`EncoderSpec` / :class:`Conditioning` and ``Family.encoder_specs`` /
  ``Family.build_conditioning``: which hidden state of each encoder is read (layer, final norm),
  whether it gives tokens, a pooled vector or both, and how the parts are put together into the
  denoiser's conditioning (concatenated along features for SD, T5 tokens alone plus CLIP pooled for
  Flux, features then sequence for SD3).
- :class:`CheckpointLayout`: single-file keys (with row ranges of fused tensors through
  :class:`CheckpointSlot`), ComfyUI's keys, the diffusers folder's component folders.
- :class:`LoraLayout`: every key prefix a LoRA file may use for a module (read) and the one written.
- :class:`EraseLayout`: the erasure stages, shallow → deep: progressive text-encoder stages
  (:class:`EncoderStage`: which linear layers of each encoder layer, grouped by the input they
  share) and denoiser stages that read the conditioning directly (:class:`ConditioningStage`: their
  input is every token of the context, or the pooled vector).
- :class:`Sampler`: the short trajectory that draws the ``(x_t, t)`` pairs of IterIS statistics
  (DDIM for SD, rectified flow for Flux).

A family's functions receive the in-memory model (``model``: an object with ``unet_config``,
``text_encoders``, ``encoder_specs``, ``layout`` and the other attributes of
:class:`~weightsmith.core.sdmodel.SDModel`) where they need it, so the family module imports nothing
above the base layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

# canonical component names (diffusers folder names) the SD families use; a family may add its own
# (Flux: "transformer"), the solvers never spell them
UNET = "unet"
TE1 = "text_encoder"
TE2 = "text_encoder_2"

DENOISER = "denoiser"
TEXT_ENCODER = "text_encoder"


@dataclass(frozen=True)
class Component:
    """One part of a model.

    ``name``: the diffusers component (and folder) name, the first part of canonical module names.
    ``role``: :data:`DENOISER` or :data:`TEXT_ENCODER`.
    ``kind``: its architecture, as the loaders build it (``"unet2d"``, ``"clip"`` (quick_gelu),
    ``"open_clip"`` (gelu, fused ``in_proj`` in single files), ``"t5"``, ``"flux"``, …).
    ``tokenizer``: the diffusers tokenizer folder of a text encoder (``"tokenizer"``,
    ``"tokenizer_2"``); ``pad_token``: the token its prompts are padded with (None: the
    tokenizer's own); ``max_length``: positions per prompt (77 for CLIP)."""

    name: str
    role: str
    kind: str
    tokenizer: str | None = None
    pad_token: str | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class EncoderSpec:
    """Which hidden state of an encoder conditions the denoiser, and how.

    ``layer``: index into ``hidden_states`` (-1: last layer, -2: penultimate); ``final_ln``: apply
    the encoder's final norm (module ``norm_path`` inside the encoder) to it; ``tokens``: its token
    states join the context; ``pooled``: its pooled output (read from the last layer) joins the
    pooled conditioning, so every layer of the encoder feeds the denoiser."""

    layer: int = -1
    final_ln: bool = True
    tokens: bool = True
    pooled: bool = False
    norm_path: str = "text_model.final_layer_norm"


@dataclass
class Conditioning:
    """What the denoiser reads from the text: ``context`` [B, T, d] and ``pooled`` [B, p] (or None)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class CheckpointSlot:
    """Where a canonical weight lives in a checkpoint: key, optional row slice of a fused tensor
    (OpenCLIP ``in_proj``, Flux's ``qkv``/``linear1``), and whether the stored tensor is the
    transpose (OpenCLIP ``text_projection``)."""

    key: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


@dataclass(frozen=True)
class CheckpointLayout:
    """How the family's models are stored.

    Single file (LDM/BFL keys): ``denoiser_prefix`` of the denoiser's keys, ``te_prefix(component)``
    → (key prefix, is_open_clip) of each text encoder, ``slot(canonical_param, layout, te_hidden)``
    → the :class:`CheckpointSlot` of a canonical parameter (``….weight``/``….bias``).
    ComfyUI (in-memory ``MODEL``/``CLIP`` keys): ``comfy_denoiser_prefix``, ``comfy_te_attrs``
    (component → attribute of ComfyUI's CLIP object, also its key prefix), ``comfy_key(canonical_param,
    layout)``. Diffusers folder: ``folders`` (component → folder)."""

    denoiser_prefix: str
    te_prefix: Callable[[str], tuple[str, bool]]
    slot: Callable[..., CheckpointSlot]
    comfy_denoiser_prefix: str
    comfy_te_attrs: Mapping[str, str]
    comfy_key: Callable[..., str]
    folders: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraLayout:
    """The family's LoRA key layouts.

    ``write_prefix(canonical, layout)``: the key prefix Weightsmith writes (before ``.lora_down…``);
    ``read_prefixes(canonical, layout)``: every prefix a LoRA file may use for that module, most
    usual first (kohya, diffusers/PEFT, ComfyUI…); ``base_model_version``: the
    ``ss_base_model_version`` written; ``metadata_hint(text)``: whether a LoRA's lower-cased
    ``ss_base_model_version``/``modelspec.architecture`` names this family; ``key_hint(prefixes)``:
    whether its key prefixes alone say so; ``foreign(prefixes)``: a phrase naming keys that mark a
    LoRA made for another family (it is then refused), or None."""

    write_prefix: Callable[..., str]
    read_prefixes: Callable[..., list[str]]
    base_model_version: str
    metadata_hint: Callable[[str], bool]
    key_hint: Callable[[list[str]], bool] = lambda prefixes: False
    foreign: Callable[[list[str]], str | None] = lambda prefixes: None


@dataclass(frozen=True)
class EncoderStage:
    """A progressive text-encoder stage: the encoder ``component``'s layers (module list at
    ``layers`` inside it) edited one after the other, shallow → deep.

    ``groups``: the editable linears of one layer grouped by the input they share, in the order the
    layer computes them; each entry (option name, path inside the layer), the option name being the
    ``--te-sublayers`` word that selects it (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``,
    ``fc1``, ``fc2``). ``canonical_layers``: the canonical prefix of the layer list (canonical name
    of a linear = ``f"{component}.{canonical_layers}.{l}.{path}"``)."""

    component: str
    layers: str
    groups: tuple[tuple[tuple[str, str], ...], ...]
    canonical_layers: str


@dataclass(frozen=True)
class ConditioningStage:
    """Denoiser linears whose input is the text conditioning itself (no image state): SD's
    cross-attention ``to_k``/``to_v``; Flux's ``context_embedder`` and ``text_embedder.linear_1``.

    ``label``: the stage's name in the erase report; ``reads``: ``"context"`` (every token of the
    context) or ``"pooled"`` (the pooled vector); ``linears(model, sublayers)``: their canonical
    names, shallow → deep (``sublayers``: the requested ``--unet-sublayers``, where they apply)."""

    label: str
    reads: str
    linears: Callable[..., list[str]]


@dataclass(frozen=True)
class EraseLayout:
    """The erasure stages, shallow → deep: ``encoder_stages(model)`` (progressive, run by
    ``erasepro`` only) then ``conditioning_stages`` (every method's final stage(s))."""

    encoder_stages: Callable[..., tuple[EncoderStage, ...]]
    conditioning_stages: tuple[ConditioningStage, ...]


class Schedule(Protocol):
    """One short trajectory of a family's sampler: ``timesteps`` (the visited t, first = noisiest),
    ``start(noise)`` → the first ``x`` from unit Gaussian noise, ``model_input(x, t)`` → what the
    denoiser reads at ``t``, ``step(pred, t, x)`` → the next ``x``."""

    timesteps: torch.Tensor

    def start(self, noise: torch.Tensor) -> torch.Tensor: ...

    def model_input(self, x: torch.Tensor, t) -> torch.Tensor: ...

    def step(self, pred: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor: ...


def _never(name: str) -> bool:
    return False


@dataclass(frozen=True)
class DenoiserStats:
    """How IterIS's memory plan and statistics see a family's denoiser modules, by canonical name
    (docs/merge.md, "Memory"; docs/method.md, "Model families"). IterIS takes its model's family's
    (``core/merge/sampling.py`` ``stats_of``); the merge code spells no family's module names.

    ``prefix``: the canonical prefix of every denoiser module (``"unet."``, ``"transformer."``);
    ``depth_stage(name)``: its place in the shallow-to-deep schedule, a tuple from ``(1,)`` on (text-encoder
    layers come first, as ``(0, layer)``); ``rows(name, levels, latent, tokens)``: the input rows one batch
    item feeds it, an upper bound (``levels``: the UNet's resolution levels, ``latent``: the latent's side,
    ``tokens``: text tokens); ``context_only(name)``: its input is the text conditioning alone (SD's
    cross-attention k/v), so its statistics need no denoiser pass; ``shared_inputs``: ``(regex,
    replacement)`` pairs giving modules that read the very same input tensor one group name (one set of
    Gram matrices)."""

    prefix: str
    depth_stage: Callable[[str], tuple]
    rows: Callable[[str, int, int, int], int]
    context_only: Callable[[str], bool] = _never
    shared_inputs: tuple = ()


@dataclass(frozen=True)
class Sampler:
    """How IterIS statistics draw ``(x_t, t)`` (docs/method.md, "IterIS sampling protocol").

    ``name``: ``"ddim"``, ``"rectified-flow"``…; ``schedule(model, steps)``: a :class:`Schedule`
    of ``steps`` steps; ``latent_shape(model, latent_size)``: (C, H, W) of one sample's starting
    noise (drawn as ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``; a
    family that packs latents, like Flux, packs them in ``predict``);
    ``predict(model, denoiser, x, t, context, pooled)``: the denoiser's output at ``(x, t)``;
    ``stats``: how the statistics and the memory plan see the denoiser's modules (:class:`DenoiserStats`)."""

    name: str
    schedule: Callable[..., Schedule]
    latent_shape: Callable[..., tuple[int, int, int]]
    predict: Callable[..., torch.Tensor]
    stats: DenoiserStats


@dataclass(frozen=True)
class Family:
    """One model family (docs/method.md, "Model families"). Fields:

    ``name`` (``"sd1"``), ``label`` (``"SD1.x"``, what users read), ``priority`` (detection order,
    lower first: a family whose marks contain another's is tested before it);
    ``components``: the denoiser first, then the text encoders in conditioning order;
    ``recognise_keys(keys)``: a single-file checkpoint's key set is this family's;
    ``recognise_components(te_configs, denoiser_config)``: loaded components are this family's;
    ``check_components(te_configs, denoiser_config)``: raise a WeightsmithError when they do not
    belong together;
    ``encoder_specs(num_layers, from_diffusers, clip_skip)`` → {component: :class:`EncoderSpec`};
    ``build_conditioning(contexts, pooled)`` → :class:`Conditioning` from per-encoder parts;
    ``denoiser_layout(config)``: the denoiser's block structure that key maps need (SD: ``UNetLayout``);
    ``checkpoint``, ``lora``, ``erase``, ``sampler``: see their classes;
    ``denoiser_defaults``: config entries the single-file loader cannot read from the weights
    (SD: ``sample_size``, ``attention_head_dim``); ``half_beside_host``: beside a host holding its
    own copy, hold the denoiser in the file's half precision (docs/a1111.md, "Memory"); ``listed``:
    position in what users read (labels, the supported-families phrase), then the name."""

    name: str
    label: str
    priority: int
    components: tuple[Component, ...]
    recognise_keys: Callable[[set], bool]
    recognise_components: Callable[..., bool]
    check_components: Callable[..., None]
    encoder_specs: Callable[..., dict]
    build_conditioning: Callable[..., Conditioning]
    denoiser_layout: Callable[..., object]
    checkpoint: CheckpointLayout
    lora: LoraLayout
    erase: EraseLayout
    sampler: Sampler
    denoiser_defaults: Mapping[str, object] = field(default_factory=dict)
    half_beside_host: bool = False
    listed: int = 0

    @property
    def denoiser(self) -> Component:
        return next(c for c in self.components if c.role == DENOISER)

    @property
    def text_encoders(self) -> tuple[Component, ...]:
        return tuple(c for c in self.components if c.role == TEXT_ENCODER)

    @property
    def text_encoder_names(self) -> list[str]:
        return [c.name for c in self.text_encoders]

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"{self.label} has no component {name!r}")
