"""Every LoRA Weightsmith writes applies exactly in A1111's Lora extension (the stand-in of
tests/a1111/fake_webui, with A1111's key resolution, alpha/dim scale and fused-MHA rule): erase
with each method, merges and a block-weighted LoRA (reweight), on SD1, SD2 (fused OpenCLIP attention)
and SDXL (issue 12). The
diffusers loads are tested in test_lora_write.py; ComfyUI's LoraLoader in test_comfy_server.py."""

import pytest
import torch
from test_a1111_adapter import _activate, _backend, _live, _load, webui  # noqa: F401, F811  (webui: a fixture, used by name)


def _a1111_rel_errors(webui, b, edit, path):
    """Per edited module: ‖(live weight with the LoRA active) − (base + ΔW)‖ / ‖ΔW‖."""
    base = {n: _live(b, n) for n in edit.deltas}
    _activate(webui, path)  # asserts every key of the file matched a layer
    errs = {}
    for n, d in edit.deltas.items():
        got = _live(b, n).double() - base[n].double()
        errs[n] = float((got - d.double().reshape(got.shape)).norm() / d.double().norm())
    _activate(webui)
    for n in edit.deltas:  # and it comes off again
        assert torch.equal(_live(b, n), base[n]), n
    return errs


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_erase_and_merge_loras_apply_exactly_in_a1111(webui, tmp_path, family):
    from pathlib import Path

    from weightsmith.core.erase.pipeline import EraseOptions, erase
    from weightsmith.core.lab.random_loras import random_lora
    from weightsmith.core.lora_read import lora_from_state_dict
    from weightsmith.core.lora_write import save_lora
    from weightsmith.core.merge import merge, save_merge

    m, sm, ck = _load(webui, family)
    b, _ = _backend()
    lora_dir = Path(webui["root"])
    worst = {}
    for method in ("erasepro", "zero-residual", "uce"):
        edit = erase(m, ["cat"], ["dog"], method=method, options=EraseOptions(expand_prompts=False))
        p = lora_dir / f"e-{family}-{method}.safetensors"
        save_lora(edit, p)
        errs = _a1111_rel_errors(webui, b, edit, p)
        assert max(errs.values()) <= 1e-5, max(errs.items(), key=lambda kv: kv[1])
        worst[method] = max(errs.values())
    loras = [
        lora_from_state_dict(random_lora(m, groups=g, rank=r, seed=s, strength=0.05)[0], m, name=f"l{s}")
        for s, g, r in ((1, ("attn", "te", "conv"), 4), (2, ("kv", "te"), 2))
    ]
    for method in ("concat", "ties"):
        edit = merge(m, loras, method, weights=[1.0, 0.5])
        p = lora_dir / f"m-{family}-{method}.safetensors"
        save_merge(edit, m, p, loras=loras)
        errs = _a1111_rel_errors(webui, b, edit, p)
        assert max(errs.values()) <= 1e-5, max(errs.items(), key=lambda kv: kv[1])
        worst[method] = max(errs.values())
    # a block-weighted single LoRA (weightsmith lora reweight; docs/merge.md, "Block weights")
    from weightsmith.core.merge.reweight import reweight

    edit = reweight(m, loras[0], "OUTALL", 0.8)
    p = lora_dir / f"rw-{family}.safetensors"
    save_merge(edit, m, p, loras=loras[:1])
    errs = _a1111_rel_errors(webui, b, edit, p)
    assert max(errs.values()) <= 1e-5, max(errs.items(), key=lambda kv: kv[1])
    assert 0 < len(edit.deltas) < len(loras[0].modules)
    worst["reweight"] = max(errs.values())
    print(f"A1111 stand-in {family}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_a1111_tab_save_never_replaces_an_input_or_existing_lora(tmp_path):
    """The tab's Save as LoRA (Workbench, host-independent): the name of an input LoRA of the merge,
    or of any LoRA already in the folder, is refused and the file is left as it was (issue 12)."""
    import hashlib
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    from weightsmith.a1111_extension.backend import StandaloneBackend, Workbench
    from weightsmith.core.errors import WeightsmithError
    from weightsmith.core.lab.random_loras import random_lora

    sys.path.insert(0, str(Path(__file__).resolve().parent / "a1111"))
    from helpers import tiny_diffusers_folder

    src = tiny_diffusers_folder(tmp_path / "model", "sd1", seed=7)
    (tmp_path / "loras").mkdir()
    b = StandaloneBackend(src, tmp_path / "loras", tmp_path / "ckpts")
    wb = Workbench(b)
    paths = []
    for i in range(3):
        t, meta = random_lora(b.model(), groups=("attn", "te"), rank=2, seed=10 + i)
        paths.append(b.lora_dir() / f"r{i}.safetensors")
        save_file(t, str(paths[-1]), metadata={k: str(v) for k, v in meta.items()})
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    edit, _ = wb.compute_merge(["r0.safetensors", "r1.safetensors"], "1, 0.5", "", "linear", {"seed": 0})
    for name in ("r0", "r1.safetensors", "r2"):
        with pytest.raises(WeightsmithError, match="already exists|is the input"):
            wb.save_lora(edit, name)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths} == sha
    wb.save_lora(edit, "merged")
    assert (b.lora_dir() / "merged.safetensors").exists()
