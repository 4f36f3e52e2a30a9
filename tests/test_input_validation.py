"""Bad inputs (model, LoRA, tokenizer, metadata) get one WeightsmithError naming the problem, before
any work where possible; docs/reliability.md, "Inputs"."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.core.cli import main
from weightsmith.core.errors import WeightsmithError
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


# ----------------------------------------------------------------------------------------------
# --tokenizer (issue 37): used as given or refused with the reason, never silently replaced
def _json_only_tokenizer(src, dst):
    """``src``'s tokenizer saved as transformers 5 does: tokenizer.json (+ config), no vocab.json."""
    from transformers import CLIPTokenizerFast

    tok = CLIPTokenizerFast.from_pretrained(str(src), local_files_only=True)
    tok.save_pretrained(str(dst))
    for p in dst.iterdir():
        if p.name not in ("tokenizer.json", "tokenizer_config.json"):
            p.unlink()
    return dst


def test_a_tokenizer_json_only_folder_is_used_and_gives_the_same_edit(cli_cases, tiny_checkpoints, tokenizer_dir,
                                                                     tmp_path):
    tj = _json_only_tokenizer(tokenizer_dir, tmp_path / "tokenizer")
    assert sorted(p.name for p in tj.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, a, "--format", "lora")) == 0
    assert main(cli_cases.erase(tiny_checkpoints["sd1"], tj, b, "--format", "lora")) == 0
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # and it is not the bundled CLIP vocabulary: the word tokenizer makes "van" one token
    from weightsmith.core.tokenizer import find_clip_tokenizer

    assert find_clip_tokenizer(tj)("van gogh").input_ids == find_clip_tokenizer(tokenizer_dir)("van gogh").input_ids


@pytest.mark.parametrize("case,words", [
    ("file", ("--tokenizer", "is a file, not a folder")),
    ("empty", ("--tokenizer", "holds no CLIP tokenizer", "lacks vocab.json and merges.txt", "contains nothing")),
    ("only_config", ("lacks vocab.json and merges.txt", "tokenizer_config.json")),
    ("broken_vocab", ("--tokenizer", "damaged")),
    ("broken_tokenizer_json", ("--tokenizer", "damaged")),
])
def test_an_unusable_tokenizer_folder_is_refused_naming_what_it_lacks(case, words, cli_cases, tiny_checkpoints,
                                                                      tokenizer_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "tok"
    if case == "file":
        bad.write_text("not a folder")
    elif case == "broken_tokenizer_json":
        _json_only_tokenizer(tokenizer_dir, bad)
        (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    else:
        bad.mkdir()
        if case == "only_config":
            shutil.copy(tokenizer_dir / "tokenizer_config.json", bad)
        if case == "broken_vocab":
            for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
                shutil.copy(tokenizer_dir / f, bad)
            (bad / "vocab.json").write_text('{"a": 1, "b": ')
    out = tmp_path / "o.safetensors"
    err = cli_cases.fails(capsys, cli_cases.erase(tiny_checkpoints["sd1"], bad, out, "--format", "lora"), *words,
                          str(bad))
    assert "pass --tokenizer" not in err.lower() or case == "file"     # not a request for what was given
    assert not out.exists()
