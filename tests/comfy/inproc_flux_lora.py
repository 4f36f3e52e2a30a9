"""A Flux LoRA file through ComfyUI's own LoraLoader path, in one process (the ComfyUI venv).

    python inproc_flux_lora.py COMFY_DIR WORK_DIR   ->  WORK_DIR/patched.safetensors, WORK_DIR/result.json

WORK_DIR holds ``config.json`` (the tiny Flux transformer's ComfyUI ``unet_config``),
``base_bfl.safetensors`` (its weights, BFL names), ``base_clip.safetensors`` (CLIP-L weights under
ComfyUI's ``clip_l.transformer.`` keys) and ``lora.safetensors``. The transformer is ComfyUI's own
``comfy.ldm.flux.model.Flux`` built through ``supported_models.Flux`` at the tiny width; the LoRA goes
through ``comfy.sd.load_lora_for_models`` (``model_lora_keys_unet``/``model_lora_keys_clip``,
``convert_lora``, ``load_lora``, ``add_patches``) and ``ModelPatcher.patch_model``. The CLIP model
is a plain module holding the CLIP-L weights under ComfyUI's key names (``model_lora_keys_clip``
reads only its state-dict keys). Nothing of Weightsmith is imported here: tests/test_flux_lora.py
writes the inputs and checks the outputs.
"""

import json
import logging
import sys
from pathlib import Path

import torch


class _Tree(torch.nn.Module):
    """A module holding a flat state dict as parameters at their dotted names."""

    def __init__(self, sd):
        super().__init__()
        for k, v in sd.items():
            mod = self
            *path, leaf = k.split(".")
            for p in path:
                if not hasattr(mod, p):
                    mod.add_module(p, torch.nn.Module())
                mod = getattr(mod, p)
            mod.register_parameter(leaf, torch.nn.Parameter(v.clone(), requires_grad=False))


class _Clip:
    """What load_lora_for_models uses of comfy.sd.CLIP: cond_stage_model, clone(), add_patches()."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.cond_stage_model = patcher.model

    def clone(self):
        return _Clip(self.patcher.clone())

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)


def main(comfy_dir: str, work: str) -> None:
    sys.path.insert(0, comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    args.force_fp32 = True
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    from safetensors.torch import load_file, save_file

    work = Path(work)
    cfg = json.loads((work / "config.json").read_text())
    mc = comfy.supported_models.Flux(cfg)
    mc.set_inference_dtype(torch.float32, None)
    bm = mc.get_model({}, device=torch.device("cpu"))
    base = load_file(str(work / "base_bfl.safetensors"))
    missing, unexpected = bm.diffusion_model.load_state_dict(base, strict=True)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(bm, load_device=cpu, offload_device=cpu)
    clip_sd = load_file(str(work / "base_clip.safetensors"))
    clip = _Clip(comfy.model_patcher.ModelPatcher(_Tree(clip_sd), load_device=cpu, offload_device=cpu))

    missed = []

    class Grab(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "not loaded" in msg.lower():
                missed.append(msg)

    grab = Grab()
    logging.getLogger().addHandler(grab)
    try:
        lora = comfy.utils.load_torch_file(str(work / "lora.safetensors"))
        m2, c2 = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(grab)
    m2.patch_model()
    c2.patcher.patch_model()
    out = {"diffusion_model." + k: v.detach().float().contiguous() for k, v in bm.diffusion_model.state_dict().items()}
    out.update({k: v.detach().float().contiguous() for k, v in c2.patcher.model.state_dict().items()})
    save_file(out, str(work / "patched.safetensors"))
    (work / "result.json").write_text(json.dumps({"not_loaded": missed, "n_lora_keys": len(lora)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
