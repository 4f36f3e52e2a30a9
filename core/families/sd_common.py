"""What SD1.x, SD2.x and SDXL share (docs/method.md, "Model families"): the UNet and its LDM key
map, CLIP/OpenCLIP key maps, the kohya/ComfyUI/diffusers LoRA prefixes, the text-encoder and
cross-attention erasure stages, the DDIM sampler of IterIS statistics, and :func:`sd_family`, which
builds a :class:`~.base.Family` from the few facts that tell the three apart.

Canonical module names: the diffusers component name plus the module path inside it, with
transformers' on-disk ``text_model.`` prefix for text encoders::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k
    text_encoder.text_model.encoder.layers.3.self_attn.k_proj
    text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj        (SDXL's OpenCLIP-bigG)

The UNet map is derived from the UNet's config (block types and ``layers_per_block``), so small or
unusual UNets map as well as the standard ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import WeightsmithError
from .base import (
    DENOISER,
    TE1,
    TE2,
    TEXT_ENCODER,
    UNET,
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

CLIP_EOS = "<|endoftext|>"  # CLIP-L pads with its end token; OpenCLIP with "!" (id 0)
OPEN_CLIP_PAD = "!"
CLIP_POSITIONS = 77

LDM_UNET_PREFIX = "model.diffusion_model."
COMFY_UNET_PREFIX = "diffusion_model."

_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_DIFF = {v: k for k, v in _RESNET_LDM.items()}


def te_path(name: str) -> str:
    """A text-encoder parameter or module path in canonical form: with ``text_model.`` (transformers
    5 keeps no nested ``text_model`` module in memory; checkpoints and kohya names always have it),
    except CLIPTextModelWithProjection's top-level ``text_projection``. The one place this rule lives."""
    return name if name.startswith(("text_model.", "text_projection")) else "text_model." + name


def _cfg_get(config, key, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class UNetLayout:
    """The block structure of a UNet, enough to map diffusers paths to LDM paths."""

    down_has_attn: tuple[bool, ...]
    up_has_attn: tuple[bool, ...]
    layers_per_block: int
    mid_has_attn: bool = True

    @classmethod
    def from_config(cls, config) -> UNetLayout:
        down = tuple("CrossAttn" in t for t in _cfg_get(config, "down_block_types"))
        up = tuple("CrossAttn" in t for t in _cfg_get(config, "up_block_types"))
        lpb = _cfg_get(config, "layers_per_block", 2)
        if not isinstance(lpb, int):
            lpb = int(lpb[0])
        mid = _cfg_get(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
        return cls(down, up, lpb, mid is not None and "CrossAttn" in str(mid))

    def block_map(self) -> list[tuple[str, str]]:
        """(diffusers prefix, LDM prefix) pairs for every block-level module."""
        pairs: list[tuple[str, str]] = [
            ("conv_in", "input_blocks.0.0"),
            ("time_embedding.linear_1", "time_embed.0"),
            ("time_embedding.linear_2", "time_embed.2"),
            ("add_embedding.linear_1", "label_emb.0.0"),
            ("add_embedding.linear_2", "label_emb.0.2"),
            ("conv_norm_out", "out.0"),
            ("conv_out", "out.2"),
        ]
        lpb = self.layers_per_block
        n_down = len(self.down_has_attn)
        for i, has_attn in enumerate(self.down_has_attn):
            for j in range(lpb):
                n = 1 + i * (lpb + 1) + j
                pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0"))
                if has_attn:
                    pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1"))
            if i < n_down - 1:
                n = 1 + i * (lpb + 1) + lpb
                pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op"))
        pairs.append(("mid_block.resnets.0", "middle_block.0"))
        if self.mid_has_attn:
            pairs.append(("mid_block.attentions.0", "middle_block.1"))
            pairs.append(("mid_block.resnets.1", "middle_block.2"))
        else:
            pairs.append(("mid_block.resnets.1", "middle_block.1"))
        n_up = len(self.up_has_attn)
        for i, has_attn in enumerate(self.up_has_attn):
            for j in range(lpb + 1):
                n = i * (lpb + 1) + j
                pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0"))
                if has_attn:
                    pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1"))
            if i < n_up - 1:
                n = i * (lpb + 1) + lpb
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{2 if has_attn else 1}.conv"))
        return pairs

    def to_ldm(self, path: str) -> str:
        """diffusers UNet module path -> LDM path (``model.diffusion_model.`` not included)."""
        for diff, ldm in sorted(self.block_map(), key=lambda p: -len(p[0])):
            if path == diff or path.startswith(diff + "."):
                rest = path[len(diff) :].lstrip(".")
                if ".resnets." in diff and rest:
                    head, _, tail = rest.partition(".")
                    rest = _RESNET_LDM.get(head, head) + ("." + tail if tail else "")
                return ldm + ("." + rest if rest else "")
        raise KeyError(f"no LDM name for UNet module {path!r}")

    def to_diffusers(self, path: str) -> str:
        """LDM UNet module path -> diffusers path."""
        for diff, ldm in sorted(self.block_map(), key=lambda p: -len(p[1])):
            if path == ldm or path.startswith(ldm + "."):
                rest = path[len(ldm) :].lstrip(".")
                if ".resnets." in diff and rest:
                    for ldm_sub, diff_sub in _RESNET_DIFF.items():
                        if rest == ldm_sub or rest.startswith(ldm_sub + "."):
                            rest = diff_sub + rest[len(ldm_sub) :]
                            break
                return diff + ("." + rest if rest else "")
        raise KeyError(f"no diffusers name for LDM UNet module {path!r}")


# ----------------------------------------------------------------------------------------------
# single-file (LDM) text-encoder keys
def sdxl_embedder_prefix(index: int, open_clip: bool) -> str:
    """State-dict prefix of SDXL's text embedder ``conditioner.embedders[index]`` (CLIP-L: HF
    ``transformer``; bigG: OpenCLIP ``model``)."""
    return f"conditioner.embedders.{index}.{'model' if open_clip else 'transformer'}."


_OC_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_OC_SUB = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}


def open_clip_slot(te_param: str, hidden: int) -> CheckpointSlot:
    """transformers CLIP parameter path (``text_model.…`` form) -> OpenCLIP key."""
    if te_param == "text_model.embeddings.token_embedding.weight":
        return CheckpointSlot("token_embedding.weight")
    if te_param == "text_model.embeddings.position_embedding.weight":
        return CheckpointSlot("positional_embedding")
    if te_param.startswith("text_model.final_layer_norm."):
        return CheckpointSlot("ln_final." + te_param.rsplit(".", 1)[1])
    if te_param == "text_projection.weight":
        return CheckpointSlot("text_projection", transposed=True)
    m = _OC_LAYER.match(te_param)
    if not m:
        raise KeyError(f"no OpenCLIP key for {te_param!r}")
    idx, rest = m.groups()
    mod, _, leaf = rest.rpartition(".")
    base = f"transformer.resblocks.{idx}."
    if mod in _QKV:
        q = _QKV[mod]
        return CheckpointSlot(base + "attn.in_proj_" + leaf, rows=(q * hidden, (q + 1) * hidden))
    if mod in _OC_SUB:
        return CheckpointSlot(base + _OC_SUB[mod] + "." + leaf)
    raise KeyError(f"no OpenCLIP key for {te_param!r}")


def checkpoint_layout(te_prefixes: dict[str, tuple[str, bool]], comfy_te_attrs: dict[str, str]) -> CheckpointLayout:
    """The LDM single-file / ComfyUI / diffusers layout of an SD family whose text encoders sit
    under ``te_prefixes`` (component → (key prefix, is_open_clip)) in a single file and under
    ComfyUI's CLIP attributes ``comfy_te_attrs``."""

    def te_prefix(component: str) -> tuple[str, bool]:
        return te_prefixes.get(component, te_prefixes[TE1])

    def slot(canonical_param: str, layout, te_hidden: dict | None = None) -> CheckpointSlot:
        comp, _, path = canonical_param.partition(".")
        if comp == UNET:
            mod, _, leaf = path.rpartition(".")
            return CheckpointSlot(LDM_UNET_PREFIX + layout.to_ldm(mod) + "." + leaf)
        prefix, is_oc = te_prefix(comp)
        if is_oc:
            s = open_clip_slot(path, (te_hidden or {})[comp])
            return CheckpointSlot(prefix + s.key, s.rows, s.transposed)
        return CheckpointSlot(prefix + path)

    def comfy_key(canonical_param: str, layout) -> str:
        comp, _, path = canonical_param.partition(".")
        if comp == UNET:
            mod, _, leaf = path.rpartition(".")
            return COMFY_UNET_PREFIX + layout.to_ldm(mod) + "." + leaf
        return comfy_te_attrs.get(comp, comfy_te_attrs[TE1]) + ".transformer." + path

    folders = {UNET: "unet", TE1: "text_encoder", TE2: "text_encoder_2"}
    return CheckpointLayout(
        denoiser_prefix=LDM_UNET_PREFIX,
        te_prefix=te_prefix,
        slot=slot,
        comfy_denoiser_prefix=COMFY_UNET_PREFIX,
        comfy_te_attrs=dict(comfy_te_attrs),
        comfy_key=comfy_key,
        folders={c: folders[c] for c in (UNET, *te_prefixes)},
    )


# ----------------------------------------------------------------------------------------------
# LoRA key layouts
def lora_layout(
    kohya_te: dict[str, str],
    comfy_te_attrs: dict[str, str],
    *,
    unet_ldm_names: bool,
    diffusers_te_aliases: bool,
    base_model_version: str,
    metadata_hint,
    key_hint=lambda prefixes: False,
    foreign=lambda prefixes: None,
) -> LoraLayout:
    """The LoRA layouts of an SD family: kohya prefixes (``kohya_te``: component → prefix; the UNet
    under diffusers paths, or LDM paths where ``unet_ldm_names``), diffusers/PEFT names, ComfyUI
    keys; ``diffusers_te_aliases``: also ``text_encoder.``/``text_encoder_2.`` without
    ``text_model.`` handling (kohya's SDXL scripts)."""

    def write_prefix(canonical: str, layout=None) -> str:
        comp, _, path = canonical.partition(".")
        if comp == UNET:
            if unet_ldm_names:
                if layout is None:
                    raise ValueError("SDXL kohya names need the UNet layout")
                path = layout.to_ldm(path)
            return "lora_unet_" + path.replace(".", "_")
        if comp in kohya_te:
            return kohya_te[comp] + path.replace(".", "_")
        raise ValueError(f"not a canonical module name: {canonical!r}")

    def read_prefixes(canonical: str, layout) -> list[str]:
        comp, _, path = canonical.partition(".")
        if comp == UNET:
            out = ["lora_unet_" + path.replace(".", "_"), "unet." + path, "base_model.model." + path]
            try:
                ldm = layout.to_ldm(path)
            except KeyError:
                return out
            ldm_names = ["lora_unet_" + ldm.replace(".", "_"), "diffusion_model." + ldm, "model.diffusion_model." + ldm]
            return out + ldm_names
        cp = comfy_te_attrs.get(comp, comfy_te_attrs[TE1]) + ".transformer."
        out = [
            kohya_te.get(comp, kohya_te[TE1]) + path.replace(".", "_"),
            f"{comp}.{path}",
            f"{comp}.{path.removeprefix('text_model.')}",
            cp + path,
            "text_encoders." + cp + path,
        ]
        if diffusers_te_aliases:
            out.append(("text_encoder." if comp == TE1 else "text_encoder_2.") + path)
        return out

    return LoraLayout(
        write_prefix=write_prefix,
        read_prefixes=read_prefixes,
        base_model_version=base_model_version,
        metadata_hint=metadata_hint,
        key_hint=key_hint,
        foreign=foreign,
    )


# ----------------------------------------------------------------------------------------------
# conditioning
def check_clip_skip(clip_skip) -> int:
    """``clip_skip`` (A1111/ComfyUI: 1 = the family's default layer, 2 = one earlier, …) checked;
    the number of layers to step back (0 for None)."""
    if clip_skip is not None and (isinstance(clip_skip, bool) or int(clip_skip) != clip_skip or clip_skip < 1):
        raise WeightsmithError(
            f"clip-skip must be a whole number from 1 (the family's default layer) up, got {clip_skip!r}."
        )
    return max(1, int(clip_skip or 1)) - 1


def single_encoder_specs(base_single_file: int, base_diffusers: int):
    """Encoder specs of a one-encoder SD family read through the final LayerNorm: layer
    ``base`` (single file / diffusers folder) stepped back by ``clip_skip``."""

    def specs(num_layers: dict[str, int], from_diffusers: bool, clip_skip: int | None = None) -> dict:
        skip = check_clip_skip(clip_skip)
        base = base_diffusers if from_diffusers else base_single_file
        layer = base - skip
        if -layer > num_layers[TE1]:
            raise WeightsmithError(
                f"clip-skip {clip_skip} is too deep for a {num_layers[TE1]}-layer text encoder; use a "
                f"value from 1 to {num_layers[TE1] + base + 1}."
            )
        return {TE1: EncoderSpec(layer, True)}

    return specs


def concat_conditioning(contexts: dict, pooled: dict) -> Conditioning:
    """SD: the encoders' token states concatenated along features; the pooled parts likewise (None
    when no encoder gives one)."""
    ctx = torch.cat(list(contexts.values()), dim=-1)
    pool = torch.cat(list(pooled.values()), dim=-1) if pooled else None
    return Conditioning(ctx, pool)


def recognise_single_encoder(gelu: bool):
    def recognise(te_configs: list, denoiser_config=None) -> bool:
        if len(te_configs) != 1:
            return False
        act = getattr(te_configs[0], "hidden_act", "quick_gelu")
        return (act == "gelu") == gelu

    return recognise


def check_context_width(te_configs: list, unet_config=None) -> None:
    """The UNet's cross-attention width must be the encoders' widths together."""
    if unet_config is None:
        return
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


def has_prefix(prefix: str):
    def recognise(keys) -> bool:
        return any(k.startswith(prefix) for k in keys)

    return recognise


# ----------------------------------------------------------------------------------------------
# erasure stages
# a CLIP layer's linears grouped by the input they read, in the order the layer computes them
CLIP_GROUPS = (
    (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"), ("v_proj", "self_attn.v_proj")),
    (("out_proj", "self_attn.out_proj"),),
    (("fc1", "mlp.fc1"),),
    (("fc2", "mlp.fc2"),),
)


def clip_encoder_stages(model) -> tuple[EncoderStage, ...]:
    """One progressive stage per text encoder, in conditioning order."""
    return tuple(
        EncoderStage(comp, "text_model.encoder.layers", CLIP_GROUPS, "text_model.encoder.layers")
        for comp in model.text_encoders
    )


def transformer_depths(unet_config: dict) -> dict:
    """Transformer blocks per attention of each (kind, index) UNet level."""
    tl = unet_config.get("transformer_layers_per_block", 1)
    n = len(unet_config["down_block_types"])
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    rev = unet_config.get("reverse_transformer_layers_per_block")
    up = list(rev) if rev else list(reversed(tl))
    up = [u if isinstance(u, int) else u[0] for u in up]
    d = {("down", i): tl[i] for i in range(n)}
    d.update({("up", i): up[i] for i in range(n)})
    d[("mid", 0)] = tl[-1]
    return d


def unet_cross_attention_names(unet_config: dict) -> list[str]:
    """Canonical names of every UNet cross-attention (``attn2``) block, shallow to deep."""
    names = []
    layout = UNetLayout.from_config(unet_config)
    lpb = layout.layers_per_block
    depths = transformer_depths(unet_config)
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


def cross_attention_linears(model, sublayers=("to_k", "to_v")) -> list[str]:
    """``to_k``/``to_v`` (the requested ``sublayers``) of every cross-attention, shallow to deep."""
    return [f"{block}.{sub}" for block in unet_cross_attention_names(model.unet_config) for sub in sublayers]


SD_ERASE = EraseLayout(
    encoder_stages=clip_encoder_stages,
    conditioning_stages=(ConditioningStage("unet", "context", cross_attention_linears),),
)


# ----------------------------------------------------------------------------------------------
# the sampler of IterIS statistics
def make_ddim(model):
    """DDIM with the model's noise schedule and "trailing" timestep spacing, so a short trajectory
    starts at the noisiest timestep (3 steps: 999, 666, 332)."""
    from diffusers import DDIMScheduler

    if model.scheduler is not None:
        # steps_offset is unused with trailing spacing; 1 keeps diffusers from warning about old configs
        return DDIMScheduler.from_config(model.scheduler.config, timestep_spacing="trailing", steps_offset=1)
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="trailing",
    )


class DDIMSchedule:
    """:class:`~.base.Schedule` over a diffusers DDIM scheduler of ``steps`` steps."""

    def __init__(self, model, steps: int):
        self.scheduler = make_ddim(model)
        self.scheduler.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps

    def start(self, noise):
        return noise * self.scheduler.init_noise_sigma

    def model_input(self, x, t):
        return self.scheduler.scale_model_input(x, t)

    def step(self, pred, t, x):
        return self.scheduler.step(pred, t, x).prev_sample


def unet_latent_shape(model, latent_size: int | None = None) -> tuple[int, int, int]:
    cfg = model.unet_config
    side = int(latent_size or cfg.get("sample_size", 64))
    return int(cfg.get("in_channels", 4)), side, side


def unet_predictor(size_conditioning: bool):
    """The UNet's noise prediction; ``size_conditioning`` (SDXL): the pooled text vector and the
    size/crop ids (the latent's pixel size, no crop) as ``added_cond_kwargs``."""

    def predict(model, unet, x, t, context, pooled=None):
        kw = {}
        if size_conditioning:
            px = x.shape[-1] * 8
            tid = torch.tensor([[px, px, 0, 0, px, px]] * x.shape[0], device=x.device, dtype=x.dtype)
            kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": tid}
        return unet(x, t.to(x.device), encoder_hidden_states=context, **kw).sample

    return predict


# ----------------------------------------------------------------------------------------------
def sd_family(
    name: str,
    label: str,
    priority: int,
    *,
    encoders: tuple[Component, ...],
    recognise_keys,
    recognise_components,
    encoder_specs,
    checkpoint: CheckpointLayout,
    lora: LoraLayout,
    size_conditioning: bool = False,
    denoiser_defaults: dict | None = None,
    half_beside_host: bool = False,
) -> Family:
    """A Stable Diffusion family: a UNet plus the given CLIP-type encoders, the shared erase stages
    and the DDIM sampler."""
    return Family(
        name=name,
        label=label,
        priority=priority,
        components=(Component(UNET, DENOISER, "unet2d"), *encoders),
        recognise_keys=recognise_keys,
        recognise_components=recognise_components,
        check_components=check_context_width,
        encoder_specs=encoder_specs,
        build_conditioning=concat_conditioning,
        denoiser_layout=UNetLayout.from_config,
        checkpoint=checkpoint,
        lora=lora,
        erase=SD_ERASE,
        sampler=Sampler("ddim", DDIMSchedule, unet_latent_shape, unet_predictor(size_conditioning), UNET_STATS),
        denoiser_defaults=denoiser_defaults or {},
        half_beside_host=half_beside_host,
    )


def unet_context_only(name: str) -> bool:
    """The UNet's cross-attention keys/values: their input is the text conditioning."""
    return name.startswith("unet.") and (name.endswith("attn2.to_k") or name.endswith("attn2.to_v"))


def unet_depth_stage(name: str) -> tuple:
    """Cross-attention k/v (fed by the text encoders only), the down blocks (with the input layers and
    time embedding), the middle block, the up blocks (with the output layers)."""
    if unet_context_only(name):
        return (1,)
    if name.startswith("unet.mid_block."):
        return (3,)
    if name.startswith(("unet.up_blocks.", "unet.conv_norm_out", "unet.conv_out")):
        return (4,)
    return (2,)


def unet_rows(name: str, levels: int, latent: int, tokens: int) -> int:
    """Text tokens for cross-attention k/v, else the pixels of the block's resolution level."""
    if unet_context_only(name):
        return tokens
    m = re.match(r"unet\.(down|up)_blocks\.(\d+)\.", name)
    lv = levels - 1 if m is None else (int(m.group(2)) if m.group(1) == "down" else levels - 1 - int(m.group(2)))
    return max(1, latent >> lv) ** 2


UNET_STATS = DenoiserStats(
    "unet.",
    unet_depth_stage,
    unet_rows,
    unet_context_only,
    (
        (re.compile(r"^(.*\.attn1)\.to_(q|k|v)$"), r"\1.qkv"),  # self-attention
        (re.compile(r"^(.*\.attn2)\.to_(k|v)$"), r"\1.kv"),  # cross-attention: the context
    ),
)


def clip_component(name: str, kind: str, tokenizer: str) -> Component:
    """A CLIP (``clip``: pads with EOS) or OpenCLIP (``open_clip``: pads with "!") text encoder."""
    pad = OPEN_CLIP_PAD if kind == "open_clip" else CLIP_EOS
    return Component(name, TEXT_ENCODER, kind, tokenizer, pad, CLIP_POSITIONS)
