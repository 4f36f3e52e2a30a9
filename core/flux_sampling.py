"""Running the Flux.1 transformer for IterIS statistics (docs/flux_lora.md, "IterIS on Flux").

IterIS and RegMean read the inputs of every module a LoRA adapts while the model samples (docs/method.md,
"IterIS sampling protocol"). On Flux the model that samples is :class:`FluxSampling`, built from a
:class:`~weightsmith.core.fluxmodel.FluxModel` for one merge:

- the **transformer** is diffusers' ``FluxTransformer2DModel`` (its module paths are Weightsmith's canonical
  Flux names, so the LoRAs' modules, fused ``qkv``/``linear1`` pieces included, are hooked where they are).
  Its weights are read from the model file (``FluxModel.transformer_param``, any layout part 1 reads: BFL, ComfyUI,
  diffusers; bf16/fp16/fp8) in the sampling precision (float32). A small transformer is held; a large one
  keeps each block on the ``meta`` device between calls and reads it from the file for each call
  (:func:`_stream`), so one block is in memory at a time whatever the depth;
- **T5** runs layer by layer as it does for erasure; the blocks a LoRA adapts are built once (streamed the
  same way when large) so that their hooks persist. **CLIP-L** is held.

The trajectory (Euler on the shifted schedule, dev's guidance embedding, latent packing and position ids)
is the family's sampler (:mod:`.families.flux`); :func:`predict` is its denoiser call.
"""

from __future__ import annotations

import functools
import re

import torch

from .errors import WeightsmithError
from .families.base import Conditioning
from .layouts.flux import CLIP_L, T5, TRANSFORMER, load_params, require_finite

GUIDANCE = 3.5  # dev's distilled guidance: ComfyUI's FluxGuidance and Forge's default
#: a transformer with more parameters than this streams its blocks (a full-size double block is 340 M)
HOLD_LIMIT = 400_000_000
_T5_BLOCK = re.compile(rf"^{T5}\.encoder\.block\.(\d+)\.(.+)$")


def require_diffusers():
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError:
        import diffusers

        raise WeightsmithError(
            f"IterIS and RegMean on Flux.1 run the transformer with diffusers' FluxTransformer2DModel, which "
            f"diffusers {diffusers.__version__} lacks: upgrade it (pip install -U 'diffusers>=0.31'), or merge "
            "with linear, concat, svd, ties or dare."
        ) from None
    return FluxTransformer2DModel


def transformer_config(flux) -> dict:
    """The ``FluxTransformer2DModel`` configuration of the model's transformer, read from the stored shapes."""

    def shape(module):
        return flux.weight_shape(f"{TRANSFORMER}.{module}")

    hidden, in_ch = shape("x_embedder")
    nd = ns = 0
    while shape(f"transformer_blocks.{nd}.attn.to_q") is not None:
        nd += 1
    while shape(f"single_transformer_blocks.{ns}.attn.to_q") is not None:
        ns += 1
    first = "transformer_blocks.0" if nd else "single_transformer_blocks.0"
    head = int(flux.transformer_param(f"{first}.attn.norm_q.weight").numel())
    return dict(
        patch_size=1,
        in_channels=int(in_ch),
        out_channels=int(shape("proj_out")[0]),
        num_layers=nd,
        num_single_layers=ns,
        attention_head_dim=head,
        num_attention_heads=int(hidden) // head,
        joint_attention_dim=int(shape("context_embedder")[1]),
        pooled_projection_dim=int(shape("time_text_embed.text_embedder.linear_1")[1]),
        guidance_embeds=shape("time_text_embed.guidance_embedder.linear_1") is not None,
        # Flux.1's rotary axes (16, 56, 56) for its 128-wide heads; other widths are test models
        axes_dims_rope=(16, 56, 56) if head == 128 else (head // 4, head // 4, head // 2),
    )


def _stream(module: torch.nn.Module, read, label: str) -> None:
    """Load ``module``'s parameters (:func:`~weightsmith.core.layouts.flux.load_params`) each time it is called
    and put them back on the ``meta`` device after, so its hooks stay while its weights come and go."""

    def post(m, args, out):
        m.to("meta")  # returns None: the output stays

    module.register_forward_pre_hook(lambda m, args: load_params(m, read, label, finite=True))
    module.register_forward_hook(post)


def _read_block_param(flux, prefix: str, dtype, name: str) -> torch.Tensor:
    return flux.transformer_param(f"{prefix}.{name}", dtype)


def build_transformer(flux, dtype=torch.float32, hold: bool | None = None):
    """The model's transformer as a ``FluxTransformer2DModel`` in ``dtype`` (docstring above); ``hold``:
    keep every block loaded (default: when it has at most :data:`HOLD_LIMIT` parameters)."""
    cls = require_diffusers()
    cfg = transformer_config(flux)
    with torch.device("meta"):
        tr = cls(**cfg)
    tr.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in tr.parameters())
    hold = n_params <= HOLD_LIMIT if hold is None else hold
    blocks = [(f"transformer_blocks.{i}", b) for i, b in enumerate(tr.transformer_blocks)]
    blocks += [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(tr.single_transformer_blocks)]
    in_blocks = set()
    for prefix, blk in blocks:
        read = functools.partial(_read_block_param, flux, prefix, dtype)
        if hold:
            load_params(blk, read, f"{TRANSFORMER}.{prefix}", finite=True)
        else:
            _stream(blk, read, f"{TRANSFORMER}.{prefix}")
        in_blocks |= {f"{prefix}.{n}" for n, _ in blk.named_parameters()}
    top = [n for n, _ in tr.named_parameters() if n not in in_blocks]
    load_params(tr, lambda n: flux.transformer_param(n, dtype), TRANSFORMER, finite=True, names=top)
    tr.streamed = not hold
    # a streamed block in ``dtype`` plus its stored copy as it is read: what one call holds beyond the rest
    size = torch.empty(0, dtype=dtype).element_size()
    tr.block_bytes = 0 if hold else max(2 * size * sum(p.numel() for p in b.parameters()) for _, b in blocks)
    return tr


# ----------------------------------------------------------------------------------------------
# the denoiser call: latents packed 2×2 into tokens, position ids, guidance (docs/flux.md, "Sampling")
def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)(W/2), 4C] (each 2×2 patch one token, channels first)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a latent of side ``h`` × ``w``."""
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h2: int, w2: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Position ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(h2, w2, 3, dtype=dtype, device=device)
    ids[..., 1] = torch.arange(h2, dtype=dtype, device=device)[:, None]
    ids[..., 2] = torch.arange(w2, dtype=dtype, device=device)[None, :]
    return ids.reshape(h2 * w2, 3)


def predict(model, denoiser, x, t, context, pooled=None) -> torch.Tensor:
    """The velocity the transformer predicts at ``(x, t)`` ([B, C, H, W] latents, ``t`` in [0, 1]) for T5
    tokens ``context`` and CLIP-L's ``pooled`` vector; dev reads the guidance :data:`GUIDANCE`."""
    b, _, h, w = x.shape
    if pooled is None:
        raise WeightsmithError("Flux's transformer needs CLIP-L's pooled vector; load CLIP-L (--text-encoder).")
    dt, dev = x.dtype, x.device
    out = denoiser(
        hidden_states=pack(x),
        encoder_hidden_states=context.to(dev, dt),
        pooled_projections=pooled.to(dev, dt),
        timestep=torch.full((b,), float(t), dtype=dt, device=dev),
        img_ids=image_ids(h // 2, w // 2, dt, dev),
        txt_ids=torch.zeros(context.shape[1], 3, dtype=dt, device=dev),
        guidance=torch.full((b,), GUIDANCE, dtype=dt, device=dev) if denoiser.config.guidance_embeds else None,
        return_dict=False,
    )[0]
    return unpack(out, h, w)


# ----------------------------------------------------------------------------------------------
class FluxSampling:
    """The Flux model IterIS samples (see the module docstring): what :class:`~.merge.iteris.IterISSolver`
    and :class:`~.merge.sampling.SamplingProtocol` ask of a model (``unet``, ``text_encoders``,
    ``module``, ``weight``, ``encode``, ``family_def``…), for the modules ``names`` the LoRAs adapt."""

    unet_config: dict = {}

    def __init__(self, flux, names, dtype=torch.float32, hold: bool | None = None):
        from . import families

        flux.require_text_encoders("IterIS and RegMean on Flux.1")
        self.flux, self.variant, self.family = flux, flux.variant, flux.family
        self.family_def = families.get(flux.family)
        self.dtype = dtype
        self.unet = build_transformer(flux, dtype, hold)
        self.latent_channels = self.unet.config.in_channels // 4
        self.clip = flux.clip  # the text encoders compute in float32 (their output is cast to ``dtype``)
        self.plan_tokens = int(flux.tokenizers[T5].model_max_length)
        t5 = flux.t5.config
        t5_params = 4 * t5.d_model * t5.num_heads * t5.d_kv + 3 * t5.d_model * t5.d_ff
        t5_block = 0 if flux.t5.keep_blocks else 2 * 4 * t5_params
        #: held for one call beyond what is loaded at the start: the memory plan reserves it
        self.transient_bytes = max(self.unet.block_bytes, t5_block)
        self.t5_blocks = {}
        text = any(n.startswith((CLIP_L + ".", T5 + ".")) for n in names)
        self._cache = None if text else {}  # prompt -> (T5 tokens, CLIP-L pooled) when no LoRA adapts them
        for i in sorted({int(m.group(1)) for n in names if (m := _T5_BLOCK.match(n))}):
            if flux.t5.keep_blocks:
                self.t5_blocks[i] = flux.t5.block(i)
            else:
                self.t5_blocks[i] = blk = flux.t5.meta_block(i)
                _stream(blk, functools.partial(flux.t5.block_param, i), f"{T5}.encoder.block.{i}")

    @property
    def text_encoders(self) -> dict:
        """CLIP-L, and the T5 blocks the LoRAs adapt (T5's other blocks run from the file)."""
        return {CLIP_L: self.clip, T5: torch.nn.ModuleDict({str(i): b for i, b in self.t5_blocks.items()})}

    def module(self, canonical: str) -> torch.nn.Module:
        comp, _, path = canonical.partition(".")
        if comp == TRANSFORMER:
            return self.unet.get_submodule(path)
        if comp == CLIP_L:
            try:
                return self.clip.get_submodule(path)
            except AttributeError:
                return self.clip.get_submodule(path.removeprefix("text_model."))
        m = _T5_BLOCK.match(canonical)
        if m is None or int(m.group(1)) not in self.t5_blocks:
            raise WeightsmithError(f"{canonical} is not a module this merge samples.")
        return self.t5_blocks[int(m.group(1))].get_submodule(m.group(2))

    def weight(self, canonical: str) -> torch.Tensor:
        """A module's weight in the sampling precision (from the file where its block is not loaded)."""
        w = self.module(canonical).weight
        if w.device.type == "meta":
            return self.flux.weight(canonical).to(self.dtype)
        return w.detach()

    def check_finite(self) -> None:
        """Held weights are finite (streamed blocks are checked as they are read)."""
        for label, mod in ((CLIP_L, self.clip), (TRANSFORMER, self.unet)):
            for n, p in mod.named_parameters():
                if p.device.type != "meta":
                    require_finite(f"{label}.{n}", p)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """T5 tokens (through the hooked blocks where the LoRAs adapt T5) and CLIP-L's pooled vector. Where
        the LoRAs adapt neither encoder, every pass reads the same conditioning: each prompt is encoded once
        and kept (T5-XXL takes seconds per prompt; 4 MB each)."""
        cache = self._cache
        todo = [p for p in dict.fromkeys(prompts) if cache is None or p not in cache]
        got = {}
        if todo:
            ctx = self.flux.t5.encode(self.flux.tokenize(todo, T5), blocks=self.t5_blocks)
            pooled = self.clip(input_ids=self.flux.tokenize(todo, CLIP_L)).pooler_output
            for j, p in enumerate(todo):
                got[p] = (ctx[j].to(self.dtype), pooled[j].to(self.dtype))
            if cache is not None:
                cache.update(got)
        rows = [got.get(p) or cache[p] for p in prompts]
        return Conditioning(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
