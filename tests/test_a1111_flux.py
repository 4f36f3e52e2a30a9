"""AUTOMATIC1111 has no Flux support: where a Flux.1 checkpoint is picked (or somehow loaded), the tab
says so plainly and points to Forge, ComfyUI and the CLI (docs/a1111.md, "Flux"), against the stand-in
web UI (tests/a1111/fake_webui); an SD checkpoint picked beside it is not affected."""

import os
import sys
from pathlib import Path

import pytest

FAKE = Path(__file__).resolve().parent / "a1111" / "fake_webui"


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui-flux")
    os.environ["WS_FAKE_WEBUI_ROOT"] = str(root)
    sys.path.insert(0, str(FAKE))
    for m in [m for m in sys.modules if m == "modules" or m.startswith("modules.") or m == "networks"]:
        del sys.modules[m]
    from modules import sd_models, shared

    yield {"root": root, "shared": shared, "sd_models": sd_models}
    sys.path.remove(str(FAKE))
    for m in [m for m in sys.modules if m == "modules" or m.startswith("modules.") or m == "networks"]:
        del sys.modules[m]


def test_a1111_tab_says_it_does_not_load_flux(webui):
    from weightsmith.a1111_extension.a1111 import A1111Backend
    from weightsmith.a1111_extension.backend import Workbench
    from weightsmith.core.errors import WeightsmithError
    from weightsmith.core.lab.random_models import build_random_flux, write_random_flux

    sd_models, shared = webui["sd_models"], webui["shared"]
    ck, _ = write_random_flux(build_random_flux(0), Path(sd_models.model_path), "comfy")
    other = Path(sd_models.model_path) / "not-flux.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(other))
    sd_models.list_models()
    b = A1111Backend()
    shared.sd_model = None
    shared.opts.sd_model_checkpoint = sd_models.CheckpointInfo(str(ck)).title
    try:
        text = b.describe()
        assert "Flux.1 model" in text and "AUTOMATIC1111 does not load Flux" in text and ck.name in text
        assert "Forge and ComfyUI" in text
        with pytest.raises(WeightsmithError, match="AUTOMATIC1111 does not load Flux"):
            Workbench(b).compute_erase("cat", "dog", "", "uce")
        shared.opts.sd_model_checkpoint = sd_models.CheckpointInfo(str(other)).title
        assert "Flux" not in b.describe()  # another checkpoint: the usual text
        with pytest.raises(WeightsmithError, match="no model is loaded"):
            Workbench(b).compute_erase("cat", "dog", "", "uce")
    finally:
        del shared.opts.sd_model_checkpoint
