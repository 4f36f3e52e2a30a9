"""modules.sd_models (A1111 v1.10): checkpoint listing and reading."""

import os

from modules import paths, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))
checkpoints_list = {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = (
            os.path.relpath(filename, model_path) if filename.startswith(model_path) else os.path.basename(filename)
        )
        self.title = self.name


def list_models():
    checkpoints_list.clear()
    roots = [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else [])
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dp, _, files in os.walk(root):
            for f in sorted(files):
                if f.endswith((".safetensors", ".ckpt")):
                    info = CheckpointInfo(os.path.join(dp, f))
                    checkpoints_list[info.title] = info


def get_state_dict_from_checkpoint(pl_sd):
    pl_sd = pl_sd.pop("state_dict", pl_sd)
    pl_sd.pop("state_dict", None)
    return pl_sd


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    _, ext = os.path.splitext(checkpoint_file)
    if ext.lower() == ".safetensors":
        import safetensors.torch

        pl_sd = safetensors.torch.load_file(checkpoint_file, device=map_location or "cpu")
    else:
        import torch

        pl_sd = torch.load(checkpoint_file, map_location=map_location or "cpu", weights_only=True)
    return get_state_dict_from_checkpoint(pl_sd)
