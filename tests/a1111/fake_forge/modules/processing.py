"""modules.processing (Forge 2.0.1v1.10.1): one txt2img batch in Forge's order, and the
persistent conditioning caches (class-level lists shared by every processing object, keyed on the
prompt, checkpoint and settings, not on the weights; three slots in Forge).

Per batch: ``forge_model_reload()`` → ``forge_objects = forge_objects_original.shallow_copy()`` →
``extra_networks.activate`` (the LoRA extension's ``load_networks``, also with no LoRA in the
prompt) → ``forge_objects = forge_objects_after_applying_lora.shallow_copy()`` → ``setup_conds()``
→ ``sample()``: the same reset again, the scripts' ``process_before_every_sampling``, and the UNet
patcher is loaded (its LoRA patches merged). Returns the conds and the UNet weights sampled with.
"""

from modules import sd_models, shared

BEFORE_EVERY_SAMPLING = []  # process_before_every_sampling(p) hooks of always-on scripts


class StableDiffusionProcessing:
    cached_uc = [None, None, None]
    cached_c = [None, None, None]

    def __init__(self, prompt="", negative_prompt="", steps=2, width=64, height=64, loras=()):
        self.prompt, self.negative_prompt, self.steps = prompt, negative_prompt, steps
        self.width, self.height = width, height
        self.loras = list(loras)  # [(LoRA file name, unet multiplier, te multiplier)]
        self.extra_network_data = {"lora": [tuple(x) for x in self.loras]}
        self.c = self.uc = None
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def close(self):
        self.c = self.uc = None
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None, None]
            StableDiffusionProcessing.cached_uc = [None, None, None]

    def cached_params(self, prompts):
        opts = shared.opts
        return (
            tuple(prompts),
            self.steps,
            opts.CLIP_stop_at_last_layers,
            shared.sd_model.sd_checkpoint_info,
            str(self.extra_network_data),
            self.width,
            self.height,
        )

    def get_conds_with_caching(self, prompts, cache):
        params = self.cached_params(prompts)
        if cache[0] is not None and cache[0] == params:
            return cache[1]
        cache[1] = self.sd_model.get_learned_conditioning(prompts)
        cache[0] = params
        return cache[1]

    def setup_conds(self):
        self.uc = self.get_conds_with_caching([self.negative_prompt], self.cached_uc)
        self.c = self.get_conds_with_caching([self.prompt], self.cached_c)

    def sample(self):
        from forge_engine import load_model_gpu

        sm = self.sd_model
        sm.forge_objects = sm.forge_objects_after_applying_lora.shallow_copy()
        for hook in BEFORE_EVERY_SAMPLING:
            hook(self)
        unet = sm.forge_objects.unet
        load_model_gpu(unet)
        return {k: v.detach().clone() for k, v in unet.model.state_dict().items()}


def process_images(p):
    import networks

    sd_models.forge_model_reload()
    p.sd_model = shared.sd_model
    p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
    networks.load_networks(
        [n for n, _, _ in p.loras],
        te_multipliers=[t for _, _, t in p.loras],
        unet_multipliers=[u for _, u, _ in p.loras],
    )
    p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
    try:
        p.setup_conds()
        return p.c, p.uc, p.sample()
    finally:
        p.close()


def txt2img(prompt, negative_prompt="", loras=()):
    """One image: ``(c, uc, UNet weights it was sampled with)``."""
    return process_images(StableDiffusionProcessing(prompt, negative_prompt, loras=loras))
