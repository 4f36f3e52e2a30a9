"""modules.processing (A1111 v1.10): the persistent conditioning cache of txt2img.

``StableDiffusionProcessing.cached_c``/``cached_uc`` and txt2img's hires ``cached_hr_c``/
``cached_hr_uc`` are class-level ``[params, conds]`` lists that every processing object shares
(``self.cached_c = StableDiffusionProcessing.cached_c``). ``get_conds_with_caching`` reuses the
stored conds while ``cached_params`` (prompt, steps, clip skip, the checkpoint's info object,
extra-network data, size and some options; **not** the weights) are equal; ``close()`` empties the
class-level caches only when ``opts.persistent_cond_cache`` is off (it is on by default). Copied
in logic from the v1.10.1 source; sampling is left out: ``process_images`` returns the conds, the
only thing the cache decides.
"""

from modules import shared


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    """prompt_parser.get_learned_conditioning: the text encoder's output for each prompt."""
    import fake_sd

    return fake_sd.encode(model, list(prompts))


get_multicond_learned_conditioning = get_learned_conditioning


class StableDiffusionProcessing:
    cached_uc = [None, None]
    cached_c = [None, None]

    def __init__(self, prompt="", negative_prompt="", steps=2, width=64, height=64, extra_network_data=None):
        self.prompt, self.negative_prompt, self.steps = prompt, negative_prompt, steps
        self.width, self.height = width, height
        self.extra_network_data = extra_network_data or {}
        self.c = self.uc = None
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def close(self):
        self.c = None
        self.uc = None
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        opts = shared.opts
        return (
            tuple(required_prompts),
            steps,
            hires_steps,
            use_old_scheduling,
            opts.CLIP_stop_at_last_layers,
            shared.sd_model.sd_checkpoint_info,
            extra_network_data,
            opts.sdxl_crop_left,
            opts.sdxl_crop_top,
            self.width,
            self.height,
            opts.fp8_storage,
            opts.cache_fp16_weight,
            opts.emphasis,
        )

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        cached_params = self.cached_params(
            required_prompts, steps, extra_network_data, hires_steps, shared.opts.use_old_scheduling
        )
        for cache in caches:
            if cache[0] is not None and cached_params == cache[0]:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, shared.opts.use_old_scheduling)
        cache[0] = cached_params
        return cache[1]

    def setup_conds(self):
        self.uc = self.get_conds_with_caching(
            get_learned_conditioning, [self.negative_prompt], self.steps, [self.cached_uc], self.extra_network_data
        )
        self.c = self.get_conds_with_caching(
            get_multicond_learned_conditioning, [self.prompt], self.steps, [self.cached_c], self.extra_network_data
        )


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]

    def __init__(self, *a, enable_hr=False, **k):
        super().__init__(*a, **k)
        self.enable_hr = enable_hr
        self.hr_c = self.hr_uc = None
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    def close(self):
        super().close()
        self.hr_c = None
        self.hr_uc = None
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
            StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]

    def setup_conds(self):
        super().setup_conds()
        if self.enable_hr:
            self.hr_uc = self.get_conds_with_caching(
                get_learned_conditioning,
                [self.negative_prompt],
                self.steps,
                [self.cached_hr_uc, self.cached_uc],
                self.extra_network_data,
                self.steps,
            )
            self.hr_c = self.get_conds_with_caching(
                get_multicond_learned_conditioning,
                [self.prompt],
                self.steps,
                [self.cached_hr_c, self.cached_c],
                self.extra_network_data,
                self.steps,
            )


def process_images(p):
    """The parts of a generation that touch the weights and the cache: the Lora extension patches
    the layers (in A1111 each layer's forward does this), then the conds are set up (cached).
    Returns ``(c, uc, hr_c, hr_uc)``."""
    import networks

    networks.generate()
    try:
        p.setup_conds()
        return p.c, p.uc, getattr(p, "hr_c", None), getattr(p, "hr_uc", None)
    finally:
        p.close()


def txt2img(prompt, negative_prompt="", enable_hr=False, extra_network_data=None):
    """Like modules.txt2img.txt2img (one image): returns the conds the image is sampled from."""
    p = StableDiffusionProcessingTxt2Img(
        prompt, negative_prompt, extra_network_data=extra_network_data, enable_hr=enable_hr
    )
    return process_images(p)
