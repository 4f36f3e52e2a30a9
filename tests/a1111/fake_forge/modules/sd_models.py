"""modules.sd_models (Forge 2.0.1v1.10.1): lazy loading through ``model_data`` and
``forge_model_reload``.

Until the first generation ``shared.sd_model`` is a ``FakeInitialModel`` (no checkpoint info, no
patchers); ``model_data.forge_loading_parameters`` names the selected checkpoint. Each batch calls
``forge_model_reload()``, which builds a *new* engine only when the loading parameters changed,
then fires the ``model_loaded`` callbacks. ``read_state_dict`` is Forge's empty stub.
``ENGINE_BUILDER(checkpoint_info, additional_modules)`` is the stand-in's loader (set by forge_engine)."""

import os

from modules import paths, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))
checkpoints_list = {}
ENGINE_BUILDER = None


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = (
            os.path.relpath(filename, model_path) if filename.startswith(model_path) else os.path.basename(filename)
        )
        self.title = self.name


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class ModelData:
    def __init__(self):
        self.sd_model = None
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v
        shared.sd_model = v


model_data = ModelData()


def select(filename, additional_modules=()):
    """What picking a checkpoint (and 'VAE / Text Encoder' modules) at the top of the page does."""
    model_data.forge_loading_parameters = dict(
        checkpoint_info=CheckpointInfo(str(filename)),
        additional_modules=list(additional_modules),
        unet_storage_dtype=None,
    )


def forge_model_reload():
    from modules import script_callbacks

    if model_data.forge_hash == str(model_data.forge_loading_parameters):
        return model_data.sd_model, False
    params = model_data.forge_loading_parameters
    sd_model = ENGINE_BUILDER(params["checkpoint_info"], params["additional_modules"])
    sd_model.sd_checkpoint_info = params["checkpoint_info"]
    model_data.set_sd_model(sd_model)
    model_data.forge_hash = str(params)
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model, True


def list_models():
    checkpoints_list.clear()
    for dp, _, files in os.walk(model_path):
        for f in sorted(files):
            if f.endswith((".safetensors", ".ckpt")):
                info = CheckpointInfo(os.path.join(dp, f))
                checkpoints_list[info.title] = info


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    pass  # Forge: an empty stub
