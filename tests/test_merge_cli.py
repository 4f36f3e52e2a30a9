"""`weightsmith merge` end to end on a tiny single-file model; bad inputs fail clearly, nothing written."""

import json

import torch
from safetensors.torch import save_file

from weightsmith.core.cli import main
from weightsmith.core.lab.random_loras import random_lora
from weightsmith.core.lora_read import load_lora
from weightsmith.core.merge.cli import parse_lora_arg
from weightsmith.core.model_io import load_model, save_single_file


def _merge(base, tok, *args):
    """`weightsmith merge --model BASE --tokenizer TOK ARGS --no-progress`: its exit status."""
    return main(["merge", "--model", str(base), "--tokenizer", str(tok), *map(str, args), "--no-progress"])


def test_merge_cli(tiny_models, tokenizer_dir, tmp_path, capsys):
    sd1 = tiny_models["sd1"]
    base = save_single_file(sd1, tmp_path / "base.safetensors")
    paths = []
    for s, g in ((1, ("attn", "te")), (2, ("ff", "te"))):
        t, meta = random_lora(sd1, groups=g, rank=2, seed=s, tags={f"tag{s}": 3, "photo": 1})
        paths.append(tmp_path / f"l{s}.safetensors")
        save_file(t, str(paths[-1]), metadata=meta)
    out, rep = tmp_path / "m.safetensors", tmp_path / "m.json"
    small = "--iterations 1 --samples 2 --steps 1 --latent-size 8".split()
    loras = ["--lora", paths[0], "--lora", f"{paths[1]}:0.5", "--prompts", paths[0], "a red cat; a dog"]
    rc = _merge(base, tokenizer_dir, *loras, *small, "--out", out, "--report", rep)
    assert rc == 0, capsys.readouterr().err
    r = json.loads(rep.read_text())
    for k in ("method", "loras", "time_s", "iterations", "curve", "residuals"):
        assert k in r
    assert r["method"] == "iteris" and r["iterations"] == 1
    assert [l["weight"] for l in r["loras"]] == [1.0, 0.5]
    assert r["loras"][0]["prompts"] == ["a red cat", "a dog"] and r["loras"][1]["prompts_source"] == "ss_tag_frequency"
    assert all(c["objective"] is not None for c in r["curve"])
    model = load_model(base, tokenizer=tokenizer_dir)
    merged = load_lora(out, model)
    a, b = load_lora(paths[0], model), load_lora(paths[1], model)
    assert set(merged.modules) == set(a.modules) | set(b.modules)
    shared = next(n for n in a.modules if n in b.modules)
    assert merged.modules[shared].rank == 4  # exact export: rank Σ r_i

    # a baseline, a compressed rank, and a checkpoint output
    out2 = tmp_path / "lin.safetensors"
    rc = _merge(
        base, tokenizer_dir, "--lora", paths[0], "--lora", paths[1], "--method", "linear", "--rank", 1, "--out", out2
    )
    assert rc == 0
    lin = load_lora(out2, model)
    assert all(m.rank == 1 for m in lin.modules.values())
    ck = tmp_path / "ck.safetensors"
    rc = _merge(base, tokenizer_dir, "--lora", paths[0], "--method", "concat", "--format", "checkpoint", "--out", ck)
    assert rc == 0
    m2 = load_model(ck, tokenizer=tokenizer_dir)
    n = next(iter(a.modules))
    torch.testing.assert_close(m2.weight(n) - model.weight(n), a.modules[n].delta(), rtol=1e-4, atol=1e-5)


def test_merge_cli_errors_write_nothing(tiny_models, tokenizer_dir, tmp_path, capsys):
    sd1, sdxl = tiny_models["sd1"], tiny_models["sdxl"]
    base = save_single_file(sd1, tmp_path / "base.safetensors")
    good = tmp_path / "good.safetensors"
    save_file(random_lora(sd1, groups=("te",), rank=2, seed=1)[0], str(good))
    xl = tmp_path / "xl.safetensors"
    save_file(random_lora(sdxl, groups=("attn", "te"), rank=2, seed=1)[0], str(xl))
    nan = random_lora(sd1, groups=("te",), rank=2, seed=2)[0]
    k = next(iter(nan))
    nan[k] = torch.full_like(nan[k], float("nan"))
    save_file(nan, str(tmp_path / "nan.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file at all")
    out = tmp_path / "out.safetensors"
    for bad, words in (
        (xl, "SDXL"),
        (tmp_path / "nan.safetensors", "NaN"),
        (tmp_path / "corrupt.safetensors", "damaged"),
    ):
        small = "--samples 1 --steps 1 --latent-size 8".split()
        rc = _merge(base, tokenizer_dir, "--lora", good, "--lora", bad, "--out", out, *small)
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err
        assert not out.exists()
    rc = _merge(base, tokenizer_dir, "--lora", good, "--out", good)
    assert rc == 2 and "input" in capsys.readouterr().err


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_arg("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    assert parse_lora_arg("dir/a.safetensors") == ("dir/a.safetensors", 1.0)


def test_every_commands_help_renders():
    """`weightsmith … --help` for every command and sub-command (argparse reads '%' in a help text
    as a format character: an option's help saying "65% of …" broke `weightsmith merge --help`)."""
    import argparse

    from weightsmith.core.cli import build_parser

    seen, todo = [], [("weightsmith", build_parser())]
    while todo:
        name, p = todo.pop()
        text = p.format_help()
        assert text.startswith("usage:"), name
        seen.append(name)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [(f"{name} {k}", sp) for k, sp in a.choices.items()]
    assert {"weightsmith merge", "weightsmith erase", "weightsmith bench"} <= set(seen), seen
