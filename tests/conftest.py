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


@pytest.fixture(autouse=True)
def _tokenizer_env_stays_in_its_test():
    """A test that points ``WEIGHTSMITH_TOKENIZER`` at its own folder (the A1111/Forge tab's loader reads
    it) must not hand that folder to the tests after it: restore the variable after every test."""
    before = os.environ.get("WEIGHTSMITH_TOKENIZER")
    yield
    if before is None:
        os.environ.pop("WEIGHTSMITH_TOKENIZER", None)
    else:
        os.environ["WEIGHTSMITH_TOKENIZER"] = before


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
    (d / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
            }
        )
    )
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


class SolverRecorder:
    """A recording stand-in for the core entry points the hosts call to solve (``core.merge.merge``,
    ``core.erase.erase``): every call's arguments go to ``calls`` (``{"solver", "model", ..., **kwargs}``)
    and a small valid edit comes back (a zero ΔW on the model's first cross-attention key projection,
    the method and options in its report), so a host-plumbing test reads what reached the solver
    without solving. Tests that check a real result keep the real solver."""

    def __init__(self):
        self.calls = []

    def _edit(self, model, method, options):
        import dataclasses

        from weightsmith.core.edit import Edit

        name = model.unet_cross_attention_names()[0] + ".to_k"
        return Edit(
            model.family,
            dict(model.unet_config),
            {name: torch.zeros_like(model.weight(name))},
            {},
            {"method": method, "options": dataclasses.asdict(options) if options is not None else {}},
        )

    def merge(self, model, loras, method="iteris", **kw):
        self.calls.append({"solver": "merge", "model": model, "loras": list(loras), "method": method, **kw})
        return self._edit(model, method, kw.get("options"))

    def erase(self, model, targets, anchors, preserve=(), method="erasepro", options=None, **kw):
        self.calls.append(
            {
                "solver": "erase",
                "model": model,
                "targets": list(targets),
                "anchors": list(anchors),
                "preserve": list(preserve or []),
                "method": method,
                "options": options,
                **kw,
            }
        )
        return self._edit(model, method, options)


@pytest.fixture
def solver_recorder(monkeypatch):
    """:class:`SolverRecorder` installed in place of ``weightsmith.core.merge.merge`` and
    ``weightsmith.core.erase.erase`` (the hosts import them when a button or node runs)."""
    import weightsmith.core.erase as erase_pkg
    import weightsmith.core.merge as merge_pkg

    rec = SolverRecorder()
    monkeypatch.setattr(merge_pkg, "merge", rec.merge)
    monkeypatch.setattr(erase_pkg, "erase", rec.erase)
    return rec


class _CliCases:
    """Helpers shared by the fault and hostile-input tests (tests cannot import conftest reliably):
    argument lists for a small erase or merge run, a one-line failure check, file hashes."""

    @staticmethod
    def sha(p):
        import hashlib

        return hashlib.sha256(open(p, "rb").read()).hexdigest()

    @staticmethod
    def erase(ckpt, tok, out, *extra):
        return [
            "erase",
            "--model",
            str(ckpt),
            "--tokenizer",
            str(tok),
            "--target",
            "van gogh",
            "--anchor",
            "art",
            "--no-expand",
            "--max-pad",
            "4",
            "--quiet",
            "--out",
            str(out),
            *[str(e) for e in extra],
        ]

    @staticmethod
    def merge(ckpt, tok, loras, out, *extra):
        a = ["merge", "--model", str(ckpt), "--tokenizer", str(tok)]
        for l in loras:
            a += ["--lora", str(l)]
        return a + ["--method", "concat", "--no-progress", "--out", str(out), *[str(e) for e in extra]]

    @staticmethod
    def fails(capsys, argv, *words, rc=2):
        """``weightsmith argv`` exits with ``rc``, prints no traceback, and its stderr holds ``words``."""
        from weightsmith.core.cli import main

        got = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert got == rc, err
        assert "Traceback" not in err
        for w in words:
            assert w in err, err
        return err

    @staticmethod
    def no_temp(folder):
        return not [p for p in Path(folder).rglob(".ws-*")]


@pytest.fixture
def cli_cases():
    """:class:`_CliCases`: shared helpers of the reliability tests."""
    return _CliCases


@pytest.fixture
def lora_files(tiny_models, tmp_path):
    """Two small random SD1 LoRAs (attention + text encoder, rank 2) written as .safetensors."""
    from safetensors.torch import save_file

    from weightsmith.core.lab.random_loras import random_lora

    out = []
    for s in (1, 2):
        t, meta = random_lora(tiny_models["sd1"], groups=("attn", "te"), rank=2, seed=s)
        out.append(tmp_path / f"l{s}.safetensors")
        save_file(t, str(out[-1]), metadata=meta)
    return out
