"""Seeded random-weight models of each family, built in-process.

Used by tests (``size="tiny"``: a few hundred thousand parameters, unusual widths on purpose) and
by the benchmarks (``size="full"``: the SD1.5 architecture, UNet 320 channels and CLIP-L 12×768).
``size="reduced"`` (SDXL only, for ``bench erase --sweep --family sdxl``): SDXL's widths — CLIP-L
12×768 and a bigG-width encoder (1280, 20 heads) cut to 4 of its 32 layers, cross-attention 2048 —
with a two-level UNet (320, 640 channels), so the whole model stays near 1 GB.
"""

from __future__ import annotations

import torch

from ..errors import require
from ..naming import TE1, TE2
from ..sdmodel import SDModel, default_encoder_specs, detect_family
from ..tokenizer import EOS, build_word_tokenizer

TINY_TE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)


def _te_config(family: str, which: str, size: str, vocab: int, max_len: int):
    from transformers import CLIPTextConfig

    if size == "reduced":
        require(family == "sdxl", "size 'reduced' exists for the sdxl family only.")
        h, i, n, heads = (768, 3072, 12, 12) if which == TE1 else (1280, 5120, 4, 20)
    elif size == "full":
        dims = {
            ("sd1", TE1): (768, 3072, 12, 12),
            ("sd2", TE1): (1024, 4096, 23, 16),
            ("sdxl", TE1): (768, 3072, 12, 12),
            ("sdxl", TE2): (1280, 5120, 32, 20),
        }[(family, which)]
        h, i, n, heads = dims
    else:
        h = {("sd1", TE1): 128, ("sd2", TE1): 96, ("sdxl", TE1): 64, ("sdxl", TE2): 96}[(family, which)]
        i, n, heads = 2 * h, 4, 4
    act = "gelu" if (family == "sd2" or which == TE2) else "quick_gelu"
    return CLIPTextConfig(
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=n,
        num_attention_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=max_len,
        hidden_act=act,
        projection_dim=h,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )


#: the SDXL base UNet as diffusers' config has it (2.57 B parameters)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def unet_config(family: str, size: str, context: int, pixel: bool = False) -> dict:
    if family == "sdxl" and size == "full":
        return dict(SDXL_UNET, cross_attention_dim=context)
    if size == "reduced":
        cfg = dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640),
            layers_per_block=1,
            cross_attention_dim=context,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    elif size == "full":
        cfg = dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=context,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    else:
        cfg = dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=context,
            attention_head_dim=4,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    if family == "sd2":
        cfg["use_linear_projection"] = True
    if family == "sdxl":
        big = size in ("full", "reduced")
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=256 if big else 8,
            use_linear_projection=True,
            projection_class_embeddings_input_dim=(1280 if big else 96) + 6 * (256 if big else 8),
        )
        if size != "full":
            cfg["transformer_layers_per_block"] = (2, 1)
    return cfg


def build_random_model(
    family: str = "sd1", size: str = "tiny", seed: int = 0, with_unet: bool = True, weights_dtype=None
) -> SDModel:
    """A seeded random model of the family with our word tokenizer. ``weights_dtype`` (e.g.
    ``torch.bfloat16``): built directly in that dtype and held in it, computing in float32
    (:func:`..precision.hold_weights`), so a full SDXL never exists in float32 (6.9 GB instead of 13.7)."""
    old = torch.get_default_dtype()
    if weights_dtype is not None:
        torch.set_default_dtype(weights_dtype)
    try:
        return _build(family, size, seed, with_unet, weights_dtype)
    finally:
        torch.set_default_dtype(old)


def _build(family, size, seed, with_unet, weights_dtype) -> SDModel:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    max_len = 77
    pad = "!" if family in ("sd2",) else EOS
    tok = build_word_tokenizer(max_len, pad)
    vocab = len(tok)
    comps = [TE1, TE2] if family == "sdxl" else [TE1]
    tes, toks = {}, {}
    for c in comps:
        cfg = _te_config(family, c, size, vocab, max_len)
        cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
        cls = CLIPTextModelWithProjection if c == TE2 else CLIPTextModel
        te = cls(cfg).eval()
        te.requires_grad_(False)
        tes[c] = te
        toks[c] = tok if c == TE1 else build_word_tokenizer(max_len, "!")
    ctx = sum(t.config.hidden_size for t in tes.values())
    ucfg = unet_config(family, size, ctx)
    unet = UNet2DConditionModel(**ucfg).eval() if with_unet else None
    if unet is not None:
        unet.requires_grad_(False)
    if weights_dtype is not None:
        from ..precision import hold_weights

        for m in [*tes.values(), *([unet] if unet is not None else [])]:
            hold_weights(m, weights_dtype)
    fam = detect_family([t.config for t in tes.values()], ucfg)
    assert fam == family
    specs = default_encoder_specs(family, {c: t.config.num_hidden_layers for c, t in tes.items()}, from_diffusers=True)
    m = SDModel(
        family=family,
        text_encoders=tes,
        tokenizers=toks,
        encoder_specs=specs,
        unet_config=dict(unet.config) if unet is not None else ucfg,
        unet_loader=(lambda: unet) if unet is not None else None,
        scheduler=DDIMScheduler(num_train_timesteps=1000),
    )
    return m


# ----------------------------------------------------------------------------------------------
# Flux.1 (docs/flux.md, "Test models")
#: diffusers' own tiny Flux transformer (tests/models/transformers/test_models_transformer_flux.py),
#: its text widths set to the tiny encoders' below
TINY_FLUX = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    axes_dims_rope=(4, 4, 8),
)
TINY_T5 = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3)
TINY_FLUX_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1)


class RandomFlux:
    """A seeded random Flux model's components: the diffusers transformer, CLIP-L, T5 (HF modules)."""

    def __init__(self, transformer, clip, t5, variant: str):
        self.transformer, self.clip, self.t5, self.variant = transformer, clip, t5, variant

    def bfl_state(self) -> dict:
        """The transformer in BFL names (fused q/k/v and linear1 rows, norm_out halves swapped)."""
        return diffusers_to_bfl_state(self.transformer.state_dict(), self.transformer.config)

    def clip_state(self, text_model: bool = True) -> dict:
        """CLIP-L's weights as files store them (``text_model.…``; ``text_model=False``: as transformers 5's
        ``save_pretrained`` writes them, without)."""
        from ..naming import te_path

        return {
            (te_path(k) if text_model else k.removeprefix("text_model.")): v.contiguous()
            for k, v in self.clip.state_dict().items()
            if not k.endswith("position_ids")
        }

    def t5_state(self) -> dict:
        # as T5 files store it: the token embedding once, as shared.weight
        return {k: v.clone() for k, v in self.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}


def diffusers_to_bfl_state(sd: dict, config) -> dict:
    """A diffusers Flux transformer state dict in BFL names (:mod:`..layouts.flux_names`)."""
    from ..layouts.flux_names import DOUBLE_NORMS, SINGLE_NORMS, bfl_linear_names, bfl_to_diffusers, swap_halves

    hidden = (
        config["num_attention_heads"] * config["attention_head_dim"]
        if isinstance(config, dict)
        else (config.num_attention_heads * config.attention_head_dim)
    )
    nd = config["num_layers"] if isinstance(config, dict) else config.num_layers
    ns = config["num_single_layers"] if isinstance(config, dict) else config.num_single_layers
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in sd
    out, used = {}, set()
    for b in bfl_linear_names(nd, ns, guidance):
        for leaf in ("weight", "bias"):
            parts = []
            for piece in bfl_to_diffusers(b, hidden):
                k = f"{piece.diffusers}.{leaf}"
                t = sd[k]
                parts.append(swap_halves(t) if piece.swap else t)
                used.add(k)
            out[f"{b}.{leaf}"] = torch.cat(parts, 0).contiguous()
    for i in range(nd):
        for bk, dk in DOUBLE_NORMS.items():
            out[f"double_blocks.{i}.{bk}"] = sd[f"transformer_blocks.{i}.{dk}"].clone()
            used.add(f"transformer_blocks.{i}.{dk}")
    for i in range(ns):
        for bk, dk in SINGLE_NORMS.items():
            out[f"single_blocks.{i}.{bk}"] = sd[f"single_transformer_blocks.{i}.{dk}"].clone()
            used.add(f"single_transformer_blocks.{i}.{dk}")
    left = sorted(set(sd) - used)
    require(not left, f"internal: diffusers Flux keys without a BFL name: {left[:3]}")
    return out


def build_random_flux(seed: int = 0, variant: str = "dev", t5_layers: int | None = None) -> RandomFlux:
    """A seeded tiny random Flux.1 (:data:`TINY_FLUX`, :data:`TINY_T5`, :data:`TINY_FLUX_CLIP`): the
    real T5 vocabulary (32128 rows) and CLIP vocabulary (49408) with tiny widths, so the shipped
    tokenizers work; ``variant`` dev has the guidance embedder, schnell not."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    require(variant in ("dev", "schnell"), f"unknown Flux variant {variant!r}; use dev or schnell.")
    torch.manual_seed(seed)
    t5cfg = dict(TINY_T5, num_layers=t5_layers or TINY_T5["num_layers"])
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_pytorch_tanh",
            is_encoder_decoder=False,
            use_cache=False,
            dropout_rate=0.0,
            **t5cfg,
        )
    ).eval()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **TINY_FLUX_CLIP,
        )
    ).eval()
    tr = FluxTransformer2DModel(
        **TINY_FLUX,
        joint_attention_dim=t5cfg["d_model"],
        pooled_projection_dim=TINY_FLUX_CLIP["hidden_size"],
        guidance_embeds=variant == "dev",
    ).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers; every weight random and nonzero
        for p in tr.parameters():
            p.normal_(0, 0.2)
    for m in (t5, clip, tr):
        m.requires_grad_(False)
    return RandomFlux(tr, clip, t5, variant)


def _cast(sd: dict, dtype) -> dict:
    """``sd`` in a stored precision: a torch dtype, or ``"scaled_fp8"`` (ComfyUI: e4m3fn weights of
    every 2-D tensor with a float32 ``scale_weight`` each, a ``scaled_fp8`` marker; the rest float16)."""
    if dtype is None:
        return dict(sd)
    if dtype == "scaled_fp8":
        out = {}
        for k, v in sd.items():
            if v.dim() == 2 and k.endswith(".weight") and "embed" not in k and "shared" not in k:
                s = v.float().abs().max().clamp_min(1e-12) / 448.0
                out[k] = (v.float() / s).to(torch.float8_e4m3fn)
                out[k.removesuffix(".weight") + ".scale_weight"] = s.reshape(())
            else:
                out[k] = v.to(torch.float16)
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
        return out
    return {k: v.to(dtype) for k, v in sd.items()}


def write_random_flux(rf: RandomFlux, folder, layout: str = "bfl", dtype=None, t5_dtype=None) -> tuple:
    """Write ``rf`` as users have Flux: ``layout`` ``bfl`` (transformer file + ``clip_l`` + ``t5xxl``
    files), ``comfy`` (one all-in-one checkpoint) or ``diffusers`` (a model folder). ``dtype``/``t5_dtype``:
    the stored precision of the transformer / T5 (a torch dtype or ``"scaled_fp8"``). Returns
    ``(model path, [text-encoder files])``."""
    import json
    from pathlib import Path

    from ..layouts.flux import COMFY_MODEL_PREFIX, COMFY_TE_PREFIX
    from ..safe_io import atomic_save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip, t5 = rf.clip_state(), _cast(rf.t5_state(), t5_dtype)
    if layout == "bfl":
        atomic_save_file(_cast(rf.bfl_state(), dtype), folder / f"flux1-{rf.variant}.safetensors")
        atomic_save_file(clip, folder / "clip_l.safetensors")
        atomic_save_file(t5, folder / "t5xxl.safetensors")
        return folder / f"flux1-{rf.variant}.safetensors", [folder / "clip_l.safetensors", folder / "t5xxl.safetensors"]
    if layout == "comfy":
        sd = {COMFY_MODEL_PREFIX + k: v for k, v in _cast(rf.bfl_state(), dtype).items()}
        sd.update({COMFY_TE_PREFIX["text_encoder"] + k: v for k, v in clip.items()})
        sd.update({COMFY_TE_PREFIX["text_encoder_2"] + k: v for k, v in t5.items()})
        atomic_save_file(sd, folder / f"flux1-{rf.variant}-aio.safetensors")
        return folder / f"flux1-{rf.variant}-aio.safetensors", []
    require(layout == "diffusers", f"unknown Flux layout {layout!r}; use bfl, comfy or diffusers.")
    import shutil

    from ..tokenizer import bundled_clip_tokenizer_dir, bundled_t5_tokenizer_dir

    root = folder / f"flux1-{rf.variant}-diffusers"
    root.mkdir()
    for sub, sd, name, cfg in (
        (
            "transformer",
            _cast(rf.transformer.state_dict(), dtype),
            "diffusion_pytorch_model",
            dict(rf.transformer.config),
        ),
        ("text_encoder", rf.clip_state(text_model=False), "model", rf.clip.config.to_dict()),
        ("text_encoder_2", t5, "model", rf.t5.config.to_dict()),
    ):
        (root / sub).mkdir()
        atomic_save_file(
            {k: v.contiguous() for k, v in sd.items()}, root / sub / f"{name}.safetensors", {"format": "pt"}
        )
        (root / sub / "config.json").write_text(json.dumps(cfg, default=list, indent=1))
    shutil.copytree(bundled_clip_tokenizer_dir(), root / "tokenizer")
    shutil.copytree(bundled_t5_tokenizer_dir(), root / "tokenizer_2")
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
    )
    return root, []
