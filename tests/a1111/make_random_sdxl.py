"""A random-weight SDXL (base) single-file checkpoint with exactly the keys A1111 v1.10 expects, for
the real-host test (docs/a1111.md, "A real A1111 for tests"). Run it with the web UI's python:

    VENV/bin/python tests/a1111/make_random_sdxl.py WEBUI_DIR WEBUI_DIR/models/Stable-diffusion/random-sdxl.safetensors

The model is built from the generative-models repository's ``configs/inference/sd_xl_base.yaml``
(the config A1111 itself uses for SDXL) with its ``sgm`` classes; CLIP ViT-L from its config and
OpenCLIP bigG with ``pretrained=None`` (nothing is downloaded: ViT-L's config must be in the offline
Hugging Face cache, as for SD1). Seed 0, as the SD1 builder of ``a1111_setup.sh`` does it: every weight
matrix N(0, 0.02) (zero-initialised output layers included, so the text reaches the image), every 1-D
parameter offset by N(0, 0.02) (A1111's default emphasis divides by the text encoder output's mean),
parameters saved fp16, buffers fp32. Each parameter is converted as it is drawn, so the peak is the
float32 model once (~14 GB) plus the fp16 file's bytes.
"""

import importlib
import os
import sys

webui, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(webui, "repositories", "generative-models"))
import open_clip  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

_create = open_clip.create_model_and_transforms
open_clip.create_model_and_transforms = lambda arch, *a, pretrained=None, **k: _create(arch, *a, pretrained=None, **k)
transformers.CLIPTextModel.from_pretrained = classmethod(
    lambda cls, name, *a, **k: cls(transformers.CLIPTextConfig.from_pretrained(name))
)

importlib.import_module("sgm.modules.encoders.modules")  # (imports transformers' CLIPTextModel: patched above)
from sgm.util import instantiate_from_config  # noqa: E402

cfg = OmegaConf.load(
    os.path.join(webui, "repositories", "generative-models", "configs", "inference", "sd_xl_base.yaml")
)
torch.manual_seed(0)
model = instantiate_from_config(cfg.model).eval().requires_grad_(False)
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for _n, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.02
        p.data = (noise if p.dim() > 1 else p.data + noise).half()
params = {n for n, _ in model.named_parameters()}
sd = {k: (v if k in params else v.float()).contiguous() for k, v in model.state_dict().items()}
del model
save_file(sd, out + ".part", metadata={"ws_note": "random weights (seed 0) for tests"})
os.replace(out + ".part", out)
print("wrote", out, len(sd), "tensors")
