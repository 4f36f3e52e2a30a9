"""The LoRA extension of Forge (extensions-builtin/sd_forge_lora/networks.py), stand-in.

``load_networks`` returns at once when the LoRA set (files, multipliers) is the one loaded
(``current_lora_hash``); else it resets ``forge_objects.unet/clip`` to ``forge_objects_original``
and stacks each LoRA as a clone + ``add_patches(filename=…)``, then keeps the result as
``forge_objects_after_applying_lora``. Like Forge, a LoRA file's tensors are cached by path
(``load_lora_state_dict`` is an ``lru_cache``): a file written again under a path already read keeps
its old tensors until that cache is cleared. The tensors are mapped with Weightsmith's reader (Forge
has its own key maps; what matters here is what Forge does with the patchers and the files).
"""

import functools
import os

from modules import sd_models, shared

listed = 0


def list_available_networks():
    global listed
    listed += 1


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    from weightsmith.core.lora_read import read_lora_file

    return read_lora_file(filename)


def _patches(sd_model, filename):
    from weightsmith.core.edit import Edit, patcher_patches
    from weightsmith.core.lora_read import lora_from_state_dict
    from weightsmith.core.model_io import load_model

    base = load_model(sd_model.sd_checkpoint_info.filename, tokenizer=_tokenizer())
    tensors, meta = load_lora_state_dict(filename)
    lora = lora_from_state_dict(tensors, base, metadata=meta, name=os.path.basename(filename))
    e = Edit(base.family, dict(base.unet_config), {n: m.delta() for n, m in lora.modules.items()}, {}, {})
    shapes = {k: p.shape for k, p in sd_model.forge_objects_original.unet.model.named_parameters()}
    shapes.update({k: p.shape for k, p in sd_model.forge_objects_original.clip.patcher.model.named_parameters()})
    return patcher_patches(e, shapes)


def _tokenizer():
    import forge_engine

    return forge_engine.TOKENIZER


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    sm = sd_models.model_data.get_sd_model()
    if sm is None:
        return
    lora_dir = shared.cmd_opts.lora_dir
    targets = [[os.path.join(lora_dir, n), u, t, False] for n, u, t in zip(names, unet_multipliers, te_multipliers)]
    h = str(targets)
    if sm.current_lora_hash == h:
        return
    sm.current_lora_hash = h
    sm.forge_objects.unet = sm.forge_objects_original.unet
    sm.forge_objects.clip = sm.forge_objects_original.clip
    for filename, u, t, online in targets:
        unet_p, clip_p = _patches(sm, filename)
        unet, clip = sm.forge_objects.unet.clone(), sm.forge_objects.clip.clone()
        unet.add_patches(filename=filename, patches=unet_p, strength_patch=u, online_mode=online)
        clip.add_patches(filename=filename, patches=clip_p, strength_patch=t, online_mode=online)
        sm.forge_objects.unet, sm.forge_objects.clip = unet, clip
    sm.forge_objects_after_applying_lora = sm.forge_objects.shallow_copy()
