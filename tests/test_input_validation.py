"""Bad inputs (model, LoRA, tokenizer, metadata) get one WeightsmithError naming the problem, before
any work where possible; docs/reliability.md, "Inputs"."""

import pytest
import torch
from safetensors.torch import save_file

from weightsmith.core.merge.random_loras import random_lora


def test_alpha_zero_is_read_as_rank_and_said(tiny_models, tmp_path):
    from weightsmith.core.lora_read import load_lora

    m = tiny_models["sd1"]
    t, _ = random_lora(m, groups=("attn",), rank=2, seed=1)
    for k in [k for k in t if k.endswith(".alpha")]:
        t[k] = torch.tensor(0.0)
    save_file(t, str(tmp_path / "a0.safetensors"))
    l = load_lora(tmp_path / "a0.safetensors", m)
    k = next(k for k in sorted(t) if k.endswith(".lora_up.weight"))
    p = k[: -len(".lora_up.weight")]
    mod = next(mm for mm in l.modules.values())
    assert all(mm.scale == 1.0 for mm in l.modules.values())
    up, down = t[p + ".lora_up.weight"].double(), t[p + ".lora_down.weight"].double()
    name = next(n for n, mm in l.modules.items() if torch.equal(mm.up, t[p + ".lora_up.weight"]))
    torch.testing.assert_close(l.modules[name].delta().double(), (up @ down).reshape(l.modules[name].shape))
    assert mod.alpha == 0.0
    assert l.notes and "alpha = rank" in l.notes[0] and "kohya" in l.notes[0]


@pytest.mark.parametrize("command", ["erase", "merge"])
def test_a_missing_tokenizer_folder_is_refused(cli_cases, command, tiny_checkpoints, lora_files, tmp_path, capsys):
    missing = tmp_path / "no-such-tokenizer"
    out = tmp_path / "o.safetensors"
    argv = (cli_cases.erase(tiny_checkpoints["sd1"], missing, out, "--format", "lora") if command == "erase"
            else cli_cases.merge(tiny_checkpoints["sd1"], missing, lora_files, out))
    cli_cases.fails(capsys, argv, "--tokenizer", "does not exist")
