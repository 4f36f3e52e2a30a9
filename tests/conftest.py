import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*bos_token_id.*")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_models():
    """Seeded tiny random models of each family (built once per test session)."""
    from weightsmith.core.random_models import build_random_model

    return {f: build_random_model(f, "tiny", seed=0) for f in ("sd1", "sd2", "sdxl")}
