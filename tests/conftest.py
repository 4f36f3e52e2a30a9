import importlib.util
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")
torch.set_num_threads(min(2, torch.get_num_threads()))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models():
    """Seeded tiny random models of each family (built once per test session)."""
    from weightsmith.core.lab.random_models import build_random_model

    return {f: build_random_model(f, "tiny", seed=0) for f in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The word tokenizer of the random models, as a folder (for --tokenizer)."""
    from weightsmith.core.tokenizer import write_word_vocab

    return write_word_vocab(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_models, tmp_path_factory):
    """The tiny models written as LDM single-file checkpoints: {family: path}."""
    from weightsmith.core.model_io import save_single_file

    d = tmp_path_factory.mktemp("ckpt")
    return {f: save_single_file(m, d / f"tiny_{f}.safetensors") for f, m in tiny_models.items()}


@pytest.fixture
def one_thread():
    """One torch thread for the tiny world model: fastest, and no OpenMP spinning on busy CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_diffusers_folder(model, d):
    """Write an SD1-layout model (UNet, one text encoder and tokenizer) as a diffusers folder ``d``."""
    model.unet.save_pretrained(d / "unet", safe_serialization=True)
    model.text_encoders["text_encoder"].save_pretrained(d / "text_encoder", safe_serialization=True)
    model.tokenizers["text_encoder"].save_pretrained(d / "tokenizer")
    (d / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}))
    return d


@pytest.fixture
def install_py():
    """The repository's install.py, freshly loaded (defining it installs nothing)."""
    spec = importlib.util.spec_from_file_location("ws_install_under_test", REPO / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def diffusers_folder():
    """:func:`write_diffusers_folder` as a fixture (tests cannot import conftest reliably)."""
    return write_diffusers_folder
