"""Build the random-weight SD1.5-architecture checkpoint the ComfyUI tests load (cached).

Runs in the ComfyUI venv: ``python build_checkpoint.py OUT.safetensors COMFY_DIR``.
CLIP-L from core's ``build_random_model("sd1", "full")`` (its token embedding widened to the real
CLIP vocabulary, 49408, which ComfyUI's tokenizer uses). The UNet is the SD1.5 design cut to two
levels (channels 320/640, one resnet per level, cross-attention at 320 and in the middle block):
ComfyUI still detects it as SD15 (model_channels 320, context 768), and the whole suite runs on
two CPU cores in minutes instead of the full UNet's 15 s per sampling step. A random diffusers
``AutoencoderKL`` converted to LDM VAE keys with ComfyUI's own
``comfy.diffusers_convert.convert_vae_state_dict``; stored in fp16 to keep it small.
"""

import sys

import torch


def main(out: str, comfy_dir: str) -> None:
    sys.path.insert(0, comfy_dir)
    import comfy.diffusers_convert as dc
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from weightsmith.core.lab.random_models import build_random_model
    from weightsmith.core.model_io import atomic_save_file, to_ldm_state_dict

    m = build_random_model("sd1", "full", seed=0, with_unet=False)
    torch.manual_seed(0)
    ucfg = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640),
        layers_per_block=1,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    unet = UNet2DConditionModel(**ucfg).eval()
    m.unet_config = dict(unet.config)
    m._unet = unet
    te = m.text_encoders["text_encoder"]
    te.resize_token_embeddings(49408, mean_resizing=False)
    with torch.no_grad():  # a seeded, CLIP-like scale for the new rows
        g = torch.Generator().manual_seed(1)
        emb = te.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=g) * 0.02)
    sd = to_ldm_state_dict(m, dtype=torch.float16)
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=512,
    )
    vsd = dc.convert_vae_state_dict(vae.state_dict())
    sd.update({"first_stage_model." + k: v.to(torch.float16) for k, v in vsd.items()})
    atomic_save_file(sd, out, {"ws_test_checkpoint": "random sd1.5 architecture"})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
