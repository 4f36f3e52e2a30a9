"""The sampling protocol for IterIS statistics (docs/method.md, "IterIS sampling protocol"; this
project's design: the paper's diffusion code was never released). The trajectory, the starting noise
and the denoiser call are the model family's sampler (``Family.sampler``, docs/method.md, "Model
families"); what follows describes the SD families' (DDIM).

Samples of LoRA *i* are ``(prompt, seed)`` pairs: prompts are the user's, or by default built from
the most frequent tags of the LoRA's ``ss_tag_frequency`` metadata (else its file name). For each
sample a short DDIM trajectory (``steps`` steps, "trailing" spacing, conditional branch only, no guidance) runs with
**LoRA i** from seeded noise ``torch.randn((C, L, L), generator=torch.Generator().manual_seed(seed))``;
at every visited ``(x_t, t)`` the LoRA-i model's module inputs give rows of ``X_i`` and the
**merged** model, run at the very same ``(x_t, t, prompt)``, gives the paired rows of ``X̃_i``.
Text-encoder modules see the prompt's tokens (all 77 positions: the UNet cross-attends to every
one of them, padding included, so they are kept everywhere, consistently). Their features depend on
the prompt only, so each distinct prompt runs through the text encoders once per phase, its rows
weighted by the number of samples that use it (exactly the sum over samples); UNet
cross-attention ``to_k``/``to_v`` read that context there too. When the LoRAs touch no other UNet
module, no UNet pass runs at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import WeightsmithError
from ..precision import compute_dtype

FALLBACK_PROMPTS = ("a photo of {}", "{}", "a picture of {}, detailed", "{} in a garden")


@dataclass(frozen=True)
class Sample:
    prompt: str
    seed: int


def default_prompts(lora, count: int = 4, tags_per_prompt: int = 4) -> tuple[list[str], str]:
    """Prompts for a LoRA without user prompts: windows over its most frequent training tags
    (``ss_tag_frequency``), else its trigger phrase or file name. Returns (prompts, source)."""
    freq = lora.tag_frequency()
    if freq:
        tags = [t for t, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]
        prompts = []
        for k in range(count):
            window = tags[k : k + tags_per_prompt] or tags[:tags_per_prompt]
            prompts.append(", ".join(window))
        return list(dict.fromkeys(prompts)), "ss_tag_frequency"
    trig = lora.metadata.get("modelspec.trigger_phrase") or lora.metadata.get("ss_output_name")
    word = (trig or lora.name).replace("_", " ").strip() or "an image"
    return [p.format(word) for p in FALLBACK_PROMPTS[: max(1, count)]], "file name" if not trig else "trigger phrase"


def make_samples(prompts: list[str], n: int, seed: int) -> list[Sample]:
    """``n`` samples cycling through ``prompts`` with seeds ``seed, seed+1, …``."""
    if not prompts:
        raise WeightsmithError("no prompts to sample with; pass --prompts.")
    return [Sample(prompts[k % len(prompts)], seed + k) for k in range(int(n))]


def make_scheduler(model):
    """The scheduler of the model family's sampler before its timesteps are set (SD: DDIM with the
    model's noise schedule and "trailing" spacing, so 3 steps visit 999, 666, 332)."""
    return model.family_def.sampler.schedule(model, 1).scheduler


def denoiser_stats(name: str, denoiser=None):
    """How the statistics see module ``name`` when it is a denoiser module
    (:class:`~weightsmith.core.families.base.DenoiserStats`), else None (a text-encoder module).
    ``denoiser``: the model family's declaration (:func:`stats_of`), which the merge passes; without it,
    the registered family whose denoiser prefix ``name`` has (SD1/SD2/SDXL share ``unet.``'s)."""
    if denoiser is not None:
        return denoiser if name.startswith(denoiser.prefix) else None
    from .. import families

    for fam in families.all_families():
        st = fam.sampler.stats
        if name.startswith(st.prefix):
            return st
    return None


def stats_of(model):
    """The :class:`~weightsmith.core.families.base.DenoiserStats` of ``model``'s family (None when the
    model declares no family)."""
    fam = getattr(model, "family_def", None)
    return None if fam is None else fam.sampler.stats


def is_denoiser(name: str, denoiser=None) -> bool:
    """A module of the denoiser (its inputs come from denoiser passes, except :func:`is_context_only`'s)."""
    return denoiser_stats(name, denoiser) is not None


def is_context_only(name: str, denoiser=None) -> bool:
    """Denoiser modules whose input is the text conditioning alone (SD's cross-attention keys/values)."""
    st = denoiser_stats(name, denoiser)
    return st is not None and st.context_only(name)


def progress_units(samples, batch_size: int, steps: int, need_unet: bool) -> tuple[int, int]:
    """(text batches, UNet steps) of one :class:`SamplingProtocol` run over ``samples``."""
    batch, steps = max(1, int(batch_size)), max(1, int(steps))
    n_text = -(-len({s.prompt for s in samples}) // batch)
    return n_text, (-(-len(samples) // batch) * steps if need_unet else 0)


class SamplingProtocol:
    """Runs samples through paired passes. ``phases``: [(delta set, stats mode), …]; the first phase's
    model drives the trajectory, the others are evaluated at the same ``(x_t, t, prompt)``."""

    def __init__(
        self,
        model,
        hooks,
        stats,
        *,
        steps: int = 4,
        latent_size: int | None = None,
        batch_size: int = 4,
        need_unet: bool = True,
        context_modules=(),
        check=None,
    ):
        self.model = model
        self.hooks = hooks
        self.stats = stats
        self.steps = max(1, int(steps))
        # the family's latent: channels and side (SD: the UNet's in_channels, sample_size unless given)
        self.channels, self.latent, _ = model.family_def.sampler.latent_shape(model, latent_size)
        self.batch_size = max(1, int(batch_size))
        self.need_unet = need_unet
        self.context_modules = list(context_modules)
        self.check = check or (lambda: None)
        self.tick = None  # tick(kind) after each text batch ("text") and UNet step ("unet")
        self.unet_passes = 0
        self.te_passes = 0

    def units(self, samples) -> tuple[int, int]:
        """(text batches, UNet steps) one :meth:`run` over ``samples`` makes: its progress ticks."""
        return progress_units(samples, self.batch_size, self.steps, self.need_unet)

    def batches(self, samples):
        for i in range(0, len(samples), self.batch_size):
            yield samples[i : i + self.batch_size]

    def _encode(self, prompts):
        self.te_passes += 1
        return self.model.encode(prompts)

    @torch.no_grad()
    def run(self, samples, phases) -> None:
        """Text stage: every *distinct* prompt once per phase (text-encoder features depend on the
        prompt only), its rows weighted by how many samples use it; cross-attention ``to_k``/``to_v``
        read the resulting context there too. UNet stage: every sample's trajectory, paired."""
        counts: dict[str, int] = {}
        for s in samples:
            counts[s.prompt] = counts.get(s.prompt, 0) + 1
        unique = list(counts)
        contexts: list[dict] = [dict() for _ in phases]
        for i in range(0, len(unique), self.batch_size):
            self.check()
            chunk = unique[i : i + self.batch_size]
            self.stats.item_weights = torch.tensor([float(counts[p]) for p in chunk], dtype=torch.float64)
            conds = []
            for key, mode in phases:
                self.hooks.use(key)
                self.stats.mode = mode
                conds.append(self._encode(chunk))
            for (key, mode), cond in zip(phases, conds):
                self.hooks.use(key)
                self.stats.mode = mode
                ctx = cond.context
                for n in self.context_modules:  # hooks see the context and the module's output
                    mod = self.model.module(n)
                    w = mod.weight
                    mod(ctx.to(w.device, compute_dtype(w.dtype)))
            for k, cond in enumerate(conds):
                for j, p in enumerate(chunk):
                    contexts[k][p] = (cond.context[j], None if cond.pooled is None else cond.pooled[j])
            if self.tick is not None:
                self.tick("text")
        self.stats.item_weights = None
        self.stats.mode = "off"
        if self.need_unet:
            self.stats.context_enabled = False  # already counted in the text stage
            try:
                for batch in self.batches(samples):
                    self.check()
                    self._run_unet(batch, phases, contexts)
            finally:
                self.stats.context_enabled = True
        self.stats.mode = "off"
        self.hooks.use(None)

    def _run_unet(self, batch, phases, contexts):
        unet = self.model.unet
        p = next(unet.parameters())
        dt = compute_dtype(p.dtype)  # a UNet held in half computes in float32
        sampler = self.model.family_def.sampler  # the family's trajectory and denoiser call
        sched = sampler.schedule(self.model, self.steps)
        shape = sampler.latent_shape(self.model, self.latent)
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s.seed)) for s in batch])
        z = sched.start(z).to(device=p.device, dtype=dt)
        ctxs, pools = [], []
        for k in range(len(phases)):
            ctxs.append(torch.stack([contexts[k][s.prompt][0] for s in batch]).to(p.device, dt))
            first = contexts[k][batch[0].prompt][1]
            pools.append(
                None if first is None else torch.stack([contexts[k][s.prompt][1] for s in batch]).to(p.device, dt)
            )
        for t in sched.timesteps:
            self.check()
            zin = sched.model_input(z, t)
            eps = None
            for (key, mode), ctx, pooled in zip(phases, ctxs, pools):
                self.hooks.use(key)
                self.stats.mode = mode
                out = sampler.predict(self.model, unet, zin, t, ctx, pooled)
                self.unet_passes += 1
                if eps is None:
                    eps = out
            self.stats.mode = "off"
            z = sched.step(eps, t, z)
            if self.tick is not None:
                self.tick("unet")


__all__ = [
    "Sample",
    "progress_units",
    "default_prompts",
    "make_samples",
    "make_scheduler",
    "SamplingProtocol",
    "denoiser_stats",
    "stats_of",
    "is_context_only",
    "is_denoiser",
]
