"""What every attack is built from (docs/robustness.md, "The attacks"): a prompt template with a
``{}`` slot for the adversarial tokens, the UNet conditioning computed *with gradients* from the text
encoders (the slot's token embeddings replaceable), a seeded DDIM drawing that takes a conditioning
tensor, and the denoising loss on images of the target drawn by the unedited model.

The conditioning follows each family's rule (:mod:`weightsmith.core.sdmodel`: the layer, the final
LayerNorm, SDXL's two encoders and pooled output); the drawing follows the embedded world's sampler
(:func:`weightsmith.core.world.sample.sample`: one noise tensor per seed, DDIM with eta 0, the
negative prompt "" for guidance), so on the world a plain prompt draws the world's own image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import WeightsmithError, require
from ..naming import TE2
from ..precision import compute_dtype

SLOT = "{}"


def split_template(template: str) -> tuple[str, str]:
    """``(text before the slot, text after it)`` of an attack prompt template, refused unless it holds
    ``{}`` exactly once."""
    require(
        isinstance(template, str) and template.count(SLOT) == 1,
        f"an attack prompt must hold {{}} exactly once, where the adversarial tokens go; got {template!r}. "
        'Example: --prompt "a picture of a red {}".',
    )
    pre, post = template.split(SLOT)
    return pre.strip(), post.strip()


def fill(template: str, words: str) -> str:
    """The template with ``words`` in its slot (single spaces around it)."""
    pre, post = split_template(template)
    return " ".join(p for p in (pre, words, post) if p)


def text_model(te):
    return getattr(te, "text_model", te)


def token_embedding(te) -> torch.nn.Embedding:
    return text_model(te).embeddings.token_embedding


def word_ids(tok, word: str) -> list[int]:
    """The token ids of ``word`` alone (no BOS/EOS)."""
    return list(tok(word).input_ids[1:-1])


def slot_starts(model, prompts_templates: list[str], k: int, words: list[str]) -> dict[str, list[int]]:
    """Per text encoder, the position of the first slot token in each filled template (the slot's ``k``
    words must be one token each there); refused when a template pushes the slot past the context."""
    out = {}
    for comp, tok in model.tokenizers.items():
        want = [word_ids(tok, w) for w in words]
        if any(len(w) != 1 for w in want):
            raise WeightsmithError(f"slot words {words!r} are not one token each for the {comp} tokenizer.")
        want = [w[0] for w in want]
        starts, memo = [], {}
        for tpl in prompts_templates:
            if tpl in memo:
                starts.append(memo[tpl])
                continue
            pre, _ = split_template(tpl)
            s = len(tok(pre).input_ids) - 1  # BOS + the words before the slot
            ids = tok(fill(tpl, " ".join(words)), truncation=False).input_ids
            require(
                s + k < tok.model_max_length and list(ids[s : s + k]) == want,
                f"the attack prompt {tpl!r} leaves no room for {k} tokens in the {tok.model_max_length}-token "
                "context; shorten it or lower --tokens.",
            )
            memo[tpl] = s
            starts.append(s)
        out[comp] = starts
    return out


def encode(model, prompts: list[str], starts: dict | None = None, emb: dict | None = None):
    """``(context [B, T, d], pooled [B, p] or None)`` the UNet reads for ``prompts``, differentiable; with
    ``emb`` ({encoder: [k, width] tensor}) the token embeddings at ``starts[encoder][b]`` … ``+ k`` are
    replaced by those rows (the continuous attack's slot; gradients reach ``emb``). Equal prompts are
    encoded once when no embedding is replaced per prompt."""
    uniq = list(dict.fromkeys(prompts))
    if emb is None and len(uniq) < len(prompts):
        ctx, pooled = encode(model, uniq)
        idx = torch.tensor([uniq.index(p) for p in prompts])
        return ctx[idx], (pooled[idx] if pooled is not None else None)
    ctx, pooled = [], None
    for comp, te in model.text_encoders.items():
        ids = model.tokenize(prompts, comp).to(te.device)
        hook = None
        if emb is not None and comp in emb:
            E, st = emb[comp], starts[comp]

            def replace(_m, _a, out, E=E, st=st):
                out = out.clone()
                for b, s in enumerate(st):
                    out[b, s : s + E.shape[0]] = E.to(out.dtype)
                return out

            hook = token_embedding(te).register_forward_hook(replace)
        try:
            out = te(input_ids=ids, output_hidden_states=True)
        finally:
            if hook is not None:
                hook.remove()
        spec = model.encoder_specs[comp]
        h = out.hidden_states[spec.layer]
        if spec.final_ln:
            h = text_model(te).final_layer_norm(h)
        ctx.append(h.float())
        if model.family == "sdxl" and comp == TE2:
            pooled = (out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output).float()
    return torch.cat(ctx, dim=-1), pooled


def unet_eps(model, x: torch.Tensor, t, ctx: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """The UNet's noise prediction (float32) for a batch, SDXL's size conditioning added."""
    unet = model.unet
    p = next(unet.parameters())
    dt = compute_dtype(p.dtype)
    kw = {}
    if model.family == "sdxl":
        require(pooled is not None, "an SDXL conditioning needs the pooled text embedding.")
        px = x.shape[-1] * 8
        tid = torch.tensor([[px, px, 0, 0, px, px]] * x.shape[0], device=p.device, dtype=dt)
        kw["added_cond_kwargs"] = {"text_embeds": pooled.to(p.device, dt), "time_ids": tid}
    t = t.to(p.device) if torch.is_tensor(t) else t
    return unet(x.to(p.device, dt), t, encoder_hidden_states=ctx.to(p.device, dt), **kw).sample.float()


def guidance_for(model, guidance: float | None) -> float:
    """``guidance``, or the model's usual scale: 1.5 for a pixel-space model (the embedded world's sampler
    default), 7.5 for a latent Stable Diffusion model."""
    if guidance is not None:
        return float(guidance)
    return 1.5 if int(model.unet_config.get("in_channels", 4)) == 3 else 7.5


def scheduler(model):
    """The model's DDIM noise schedule (a Stable Diffusion default where the model brings none)."""
    from diffusers import DDIMScheduler

    if model.scheduler is not None:
        return DDIMScheduler.from_config(model.scheduler.config)
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def initial_noise(model, seeds) -> torch.Tensor:
    """One noise tensor per seed, drawn alone (so an image never depends on its batch)."""
    ch, size = int(model.unet_config["in_channels"]), int(model.unet_config["sample_size"])
    return torch.cat([torch.randn(1, ch, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def draw(model, cond, seeds, steps: int, guidance: float, uncond=None, batch: int = 32, check=None) -> torch.Tensor:
    """DDIM (eta 0) images of ``model`` under ``cond = (context [N, T, d], pooled)``, one per seed, in the
    model's own space (latents; the world's pixels in [-1, 1]). ``uncond``: the conditioning of the
    negative prompt (default: ``""``); ``check()`` is called between batches (cancellation)."""
    ctx, pooled = cond
    seeds = list(seeds)
    require(ctx.shape[0] == len(seeds), "draw: one conditioning row per seed.")
    if guidance != 1 and uncond is None:
        uncond = encode(model, [""])
    sched = scheduler(model)
    sched.set_timesteps(int(steps))
    outs = []
    for i in range(0, len(seeds), batch):
        if check is not None:
            check()
        n = len(seeds[i : i + batch])
        c = ctx[i : i + n]
        pc = pooled[i : i + n] if pooled is not None else None
        if guidance != 1:
            uc, up = uncond
            c = torch.cat([uc.expand(n, -1, -1), c])
            pc = torch.cat([up.expand(n, -1), pc]) if pc is not None else None
        x = initial_noise(model, seeds[i : i + n]) * sched.init_noise_sigma
        for t in sched.timesteps:
            if guidance != 1:
                eps_u, eps_c = unet_eps(model, torch.cat([x, x]), t, c, pc).chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            else:
                eps = unet_eps(model, x, t, c, pc)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        outs.append(x.float().cpu())
    return torch.cat(outs)


@dataclass
class Targets:
    """Images of the target drawn by the unedited model: ``x0[i]`` was drawn from ``templates[i]`` with
    the target in its slot, at ``seeds[i]`` (model space)."""

    target: str
    templates: list[str]
    seeds: list[int]
    x0: torch.Tensor


def draw_targets(base, target: str, templates: list[str], seeds, steps: int, guidance: float, check=None) -> Targets:
    """``len(seeds)`` images of ``target``, templates cycled, drawn by ``base``."""
    seeds = list(seeds)
    tpls = [templates[i % len(templates)] for i in range(len(seeds))]
    cond = encode(base, [fill(t, target) for t in tpls])
    cond = (cond[0].detach(), None if cond[1] is None else cond[1].detach())
    return Targets(target, tpls, seeds, draw(base, cond, seeds, steps, guidance, check=check))


@dataclass
class Draws:
    """Noisy versions of the target images: item ``j`` is image ``idx[j]`` noised to step ``t[j]``."""

    idx: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    teacher: torch.Tensor | None = None  # the unedited model's prediction under the target prompt


def make_draws(model, targets: Targets, per_image: int, gen: torch.Generator, teacher: bool = False) -> Draws:
    """``per_image`` (timestep, noise) draws for every target image from ``gen`` (uniform timesteps);
    ``teacher``: with ``model``'s own prediction under the prompt each image was drawn from."""
    sched = scheduler(model)
    n = targets.x0.shape[0]
    idx = torch.arange(n).repeat(per_image)
    T = int(sched.config.num_train_timesteps)
    t = torch.randint(0, T, (len(idx),), generator=gen)
    noise = torch.randn((len(idx), *targets.x0.shape[1:]), generator=gen)
    ab = sched.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * targets.x0[idx] + (1 - ab).sqrt() * noise
    d = Draws(idx, t, noise, x_t)
    if teacher:
        with torch.no_grad():
            cond = encode(model, [fill(targets.templates[i], targets.target) for i in idx.tolist()])
            d.teacher = unet_eps(model, x_t, t, *cond).cpu()
    return d


def denoise_loss(model, draws: Draws, cond) -> torch.Tensor:
    """Mean squared error of ``model``'s noise prediction on the draws under ``cond`` (one row per draw),
    against the drawn noise, or against the unedited model's prediction where the draws carry it."""
    ctx, pooled = cond
    eps = unet_eps(model, draws.x_t, draws.t, ctx, pooled)
    ref = draws.noise if draws.teacher is None else draws.teacher
    return (eps - ref.to(eps.device)).pow(2).mean()


def check_family(model) -> None:
    """Refuse a model family the attacks do not handle (they read CLIP encoders and a UNet: the
    families whose denoiser is a ``unet2d``)."""
    from .. import families

    fam = getattr(model, "family", None)
    known = {f.name: f for f in families.all_families()}.get(fam)
    what = f"{known.label} ({fam!r})" if known else (fam or type(model).__name__)
    require(
        known is not None and known.denoiser.kind == "unet2d",
        f"the attacks run on Stable Diffusion 1.x, 2.x and SDXL models (and the embedded world); this model is "
        f"{what}, which the attacks do not handle yet. Attack an SD1, SD2 or SDXL model.",
    )


def check_pair(base, edited) -> None:
    """Refuse a model family the attacks do not handle, and an edited model that is not an edit of
    ``base``'s architecture."""
    check_family(base)
    require(
        base.family == edited.family,
        f"the edited model is {edited.family} but the unedited model is {base.family}; attack an edit of the "
        "same model (pass the model the edit was made from).",
    )
    require(
        base.context_dim == edited.context_dim and base.layout == edited.layout,
        "the edited model's architecture differs from the unedited model's; pass the model the edit was made from.",
    )


__all__ = [
    "SLOT",
    "split_template",
    "fill",
    "encode",
    "unet_eps",
    "draw",
    "guidance_for",
    "Targets",
    "draw_targets",
    "Draws",
    "make_draws",
    "denoise_loss",
    "check_family",
    "check_pair",
]
