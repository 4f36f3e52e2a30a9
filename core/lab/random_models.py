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
