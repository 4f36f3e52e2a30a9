"""modules.shared (A1111 v1.10): only the attributes the Weightsmith tab reads."""

import os
from types import SimpleNamespace

from modules import paths
from modules.shared_state import State

sd_model = None
state = State()
# the options the tab and the cond cache (modules.processing.cached_params) read, at their defaults
opts = SimpleNamespace(
    CLIP_stop_at_last_layers=1,
    persistent_cond_cache=True,
    use_old_scheduling=False,
    sdxl_crop_left=0,
    sdxl_crop_top=0,
    fp8_storage="Disable",
    cache_fp16_weight=False,
    emphasis="Original",
)
# --ckpt-dir defaults to None; --lora-dir is added by the Lora extension's preload.py
cmd_opts = SimpleNamespace(ckpt_dir=None, lora_dir=os.path.join(paths.models_path, "Lora"))
