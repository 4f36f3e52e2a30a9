"""Deterministic text-to-image sampling for the tiny pixel-space default model.

Works on already-loaded (possibly edited) components, so erased / merged models are sampled
exactly like the shipped one::

    from weightsmith.core.world.sample import load_model, sample
    m = load_model()                       # DEFAULT_MODEL_DIR
    imgs = sample(m.unet, m.text_encoder, m.tokenizer, m.scheduler,
                  ["a red circle"] * 4, seeds=[0, 1, 2, 3])  # (4, 3, 32, 32) in [0, 1]

Determinism: the initial noise of image *i* is drawn from ``torch.Generator().manual_seed(seeds[i])``
and the sampler is DDIM with eta = 0 (a DDIMScheduler built from ``scheduler.config``), so an
image depends only on (weights, prompt, seed, steps, guidance), not on batch composition.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

from .paths import DEFAULT_MODEL_DIR


def load_model(path: str | Path = DEFAULT_MODEL_DIR) -> SimpleNamespace:
    """Load the diffusers-format folder -> namespace(unet, text_encoder, tokenizer, scheduler), eval mode, fp32 CPU."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer")
    scheduler = DDIMScheduler.from_pretrained(str(path), subfolder="scheduler")
    return SimpleNamespace(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, path=path)


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """SD1-style conditioning: last hidden state of the padded (max-length) prompt, no mask."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    dev = next(text_encoder.parameters()).device
    return text_encoder(ids.to(dev))[0]


def initial_noise(seeds: Sequence[int], channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.cat(
        [torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


@torch.no_grad()
def sample(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance: float = 1.5,
    negative_prompt: str = "",
    batch_size: int = 64,
    return_trajectory: bool = False,
):
    """Generate one image per (prompt, seed) -> float tensor (N, 3, H, W) in [0, 1] (CPU).

    ``guidance`` is the classifier-free guidance scale (1 = no guidance). With
    ``return_trajectory`` also returns the list of (t, x_t) pairs (x_t batched, [-1, 1])."""
    from diffusers import DDIMScheduler

    prompts = list(prompts)
    seeds = list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError("need one seed per prompt")
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    size = int(unet.config.sample_size)
    ch = int(unet.config.in_channels)
    dev = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    was_u, was_t = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    outs, traj = [], []
    try:
        uncond = encode_prompts(text_encoder, tokenizer, [negative_prompt]) if guidance != 1 else None
        for i in range(0, len(prompts), batch_size):
            ps, ss = prompts[i : i + batch_size], seeds[i : i + batch_size]
            cond = encode_prompts(text_encoder, tokenizer, ps).to(dev, dtype)
            n = len(ps)
            if uncond is not None:
                ctx = torch.cat([uncond.to(dev, dtype).expand(n, -1, -1), cond])
            x = initial_noise(ss, ch, size).to(dev, dtype) * sched.init_noise_sigma
            for t in sched.timesteps:
                if uncond is not None:
                    eps_u, eps_c = unet(torch.cat([x, x]), t, ctx).sample.chunk(2)
                    eps = eps_u + guidance * (eps_c - eps_u)
                else:
                    eps = unet(x, t, cond).sample
                if return_trajectory:
                    traj.append((int(t), x.detach().cpu()))
                x = sched.step(eps, t, x, eta=0.0).prev_sample
            outs.append(((x.float().cpu() + 1) / 2).clamp(0, 1))
    finally:
        unet.train(was_u)
        text_encoder.train(was_t)
    imgs = torch.cat(outs)
    return (imgs, traj) if return_trajectory else imgs


def to_uint8(images: torch.Tensor):
    """(N,3,H,W) float [0,1] -> (N,H,W,3) uint8 numpy."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, path: str | Path, cols: int = 8, scale: int = 4) -> None:
    """Save a PNG grid of (N,3,H,W) images (nearest-upscaled by ``scale``)."""
    import numpy as np
    from PIL import Image

    a = to_uint8(images)
    n, h, w, _ = a.shape
    rows = (n + cols - 1) // cols
    g = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        g[r * h : (r + 1) * h, c * w : (c + 1) * w] = a[i]
    Image.fromarray(g).resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(str(path))
