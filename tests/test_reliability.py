"""Issue 12: no data loss, no silent wrong output. Written paths never hit an input or each other,
non-finite values are refused where they enter and before anything is written, options are
validated, file-system faults give one line and leave no temp file, outputs get the umask mode.
docs/reliability.md tabulates these cases."""
import errno
import hashlib
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.core.cli import main
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.lab.random_loras import random_lora


def _sha(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _erase(ckpt, tok, out, *extra):
    return ["erase", "--model", str(ckpt), "--tokenizer", str(tok), "--target", "van gogh", "--anchor", "art",
            "--no-expand", "--max-pad", "4", "--quiet", "--out", str(out), *[str(e) for e in extra]]


def _merge(ckpt, tok, loras, out, *extra):
    a = ["merge", "--model", str(ckpt), "--tokenizer", str(tok)]
    for l in loras:
        a += ["--lora", str(l)]
    return a + ["--method", "concat", "--no-progress", "--out", str(out), *[str(e) for e in extra]]


def _fails(capsys, argv, *words, rc=2):
    got = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert got == rc, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def lora_files(tiny_models, tmp_path):
    sd1 = tiny_models["sd1"]
    out = []
    for s in (1, 2):
        t, meta = random_lora(sd1, groups=("attn", "te"), rank=2, seed=s)
        out.append(tmp_path / f"l{s}.safetensors")
        save_file(t, str(out[-1]), metadata=meta)
    return out


def _no_temp(folder):
    return not [p for p in folder.rglob(".ws-*")]


# ----------------------------------------------------------------------------------------------
# 1. every written path differs from every input and from each other
@pytest.mark.parametrize("case", ["erase_report_is_model", "erase_report_is_out", "erase_report_is_tokenizer",
                                  "merge_report_is_model", "merge_report_is_lora", "merge_report_is_out",
                                  "merge_out_is_lora", "merge_out_is_model_symlink"])
def test_written_paths_never_replace_an_input(case, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys):
    ck = tmp_path / "model.safetensors"
    ck.write_bytes(tiny_checkpoints["sd1"].read_bytes())
    out = tmp_path / "out.safetensors"
    inputs = [ck] + lora_files
    before = {p: _sha(p) for p in inputs}
    words = {"erase_report_is_model": ("--report", "is the input model"),
             "erase_report_is_out": ("--out and --report are the same path",),
             "erase_report_is_tokenizer": ("--report", "--tokenizer"),
             "merge_report_is_model": ("--report", "is the input model"),
             "merge_report_is_lora": ("--report", "is the input LoRA"),
             "merge_report_is_out": ("--out and --report are the same path",),
             "merge_out_is_lora": ("--out", "is the input LoRA"),
             "merge_out_is_model_symlink": ("--out", "is the input model")}[case]
    if case.startswith("erase"):
        rep = {"erase_report_is_model": ck, "erase_report_is_out": out, "erase_report_is_tokenizer": tokenizer_dir}[case]
        argv = _erase(ck, tokenizer_dir, out, "--format", "lora", "--report", rep)
    else:
        o, rep = out, None
        if case == "merge_report_is_model":
            rep = ck
        elif case == "merge_report_is_lora":
            rep = lora_files[1]
        elif case == "merge_report_is_out":
            rep = out
        elif case == "merge_out_is_lora":
            o = lora_files[0]
        else:
            o = tmp_path / "alias.safetensors"
            o.symlink_to(ck)
        argv = _merge(ck, tokenizer_dir, lora_files, o, *(["--report", rep] if rep else []))
    _fails(capsys, argv, *words)
    assert {p: _sha(p) for p in inputs} == before
    assert not out.exists() and _no_temp(tmp_path)


def test_api_save_lora_and_save_merge_refuse_their_inputs(tiny_models, tiny_checkpoints, tokenizer_dir,
                                                          lora_files, tmp_path):
    from weightsmith.core.erase import EraseOptions, erase
    from weightsmith.core.lora_write import save_lora
    from weightsmith.core.merge import merge, save_merge
    from weightsmith.core.model_io import load_model, save_edited_model

    ck = tmp_path / "model.safetensors"
    ck.write_bytes(tiny_checkpoints["sd1"].read_bytes())
    h = {p: _sha(p) for p in [ck] + lora_files}
    model = load_model(ck, tokenizer=tokenizer_dir)
    edit = erase(model, ["cat"], ["dog"], method="uce", options=EraseOptions(expand_prompts=False))
    with pytest.raises(WeightsmithError, match="is the input model"):
        save_lora(edit, ck)
    with pytest.raises(WeightsmithError, match="is the input model"):
        save_lora(edit.scaled(0.5), str(ck))                  # a scaled edit keeps its sources
    with pytest.raises(WeightsmithError, match="is the input model"):
        save_edited_model(model, edit.deltas, ck)
    m = merge(model, lora_files, "concat")
    for target in lora_files + [ck]:
        with pytest.raises(WeightsmithError, match="is the input"):
            save_lora(m, target)
        with pytest.raises(WeightsmithError, match="is the input"):
            save_merge(m, model, target)
    with pytest.raises(WeightsmithError, match="is the input LoRA"):
        save_merge(m, model, lora_files[1])
    assert {p: _sha(p) for p in [ck] + lora_files} == h
    save_lora(edit, tmp_path / "fine.safetensors")            # a new path is fine
    assert (tmp_path / "fine.safetensors").exists()


@pytest.mark.parametrize("case", ["inside", "file_name"])
def test_diffusers_output_inside_the_model_or_named_as_a_file_is_refused(case, tiny_models, tmp_path, capsys,
                                                                         diffusers_folder):
    import time

    src = diffusers_folder(tiny_models["sd1"], tmp_path / "model")
    files = sorted(p for p in src.rglob("*"))
    out = src / "edited" if case == "inside" else tmp_path / "x.safetensors"
    t0 = time.time()
    _fails(capsys, ["erase", "--model", src, "--target", "cat", "--anchor", "dog", "--no-expand", "--quiet",
                    "--out", out], "inside" if case == "inside" else "folder")
    assert time.time() - t0 < 20                              # refused up front, no recursive copy
    assert sorted(p for p in src.rglob("*")) == files and not out.exists()
    assert _no_temp(tmp_path)


# ----------------------------------------------------------------------------------------------
# 3. non-finite values
def _poisoned_checkpoint(src, dst, key_part, value, dtype=None):
    sd = load_file(str(src))
    key = next(k for k in sorted(sd) if key_part in k)
    t = sd[key].clone()
    t.view(-1)[0] = value
    sd[key] = t
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    from weightsmith.core.model_io import _StateFile

    save_file(sd, str(dst), metadata=_StateFile(src).metadata)
    return key


@pytest.mark.parametrize("case", ["te_nan_checkpoint", "to_k_nan_diff", "unedited_inf_checkpoint"])
def test_nonfinite_model_weights_are_refused_naming_the_tensor(case, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    src = tiny_checkpoints["sd1"]
    bad = tmp_path / "bad.safetensors"
    part, val, fmt = {"te_nan_checkpoint": ("layers.0.self_attn.k_proj.weight", float("nan"), "checkpoint"),
                      "to_k_nan_diff": ("attn2.to_k.weight", float("nan"), "diff"),
                      "unedited_inf_checkpoint": ("diffusion_model.input_blocks.0.0.weight", float("inf"), "checkpoint")}[case]
    key = _poisoned_checkpoint(src, bad, part, val)
    out = tmp_path / "out.safetensors"
    err = _fails(capsys, _erase(bad, tokenizer_dir, out, "--format", fmt), "NaN or infinite")
    named = {"te_nan_checkpoint": "layers.0.self_attn.k_proj", "to_k_nan_diff": "attn2.to_k",
             "unedited_inf_checkpoint": key}[case]
    assert named in err
    assert not out.exists() and _no_temp(tmp_path)


def test_fp16_overflow_of_a_merge_is_refused(tiny_models, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    ck16 = tmp_path / "fp16.safetensors"
    _poisoned_checkpoint(tiny_checkpoints["sd1"], ck16, "input_blocks.0.0.weight", 0.0, dtype=torch.float16)
    big = tmp_path / "big.safetensors"
    t, meta = random_lora(tiny_models["sd1"], groups=("attn",), rank=2, seed=5, strength=1e6)
    save_file(t, str(big), metadata=meta)
    out = tmp_path / "merged.safetensors"
    _fails(capsys, _merge(ck16, tokenizer_dir, [big], out, "--format", "checkpoint"), "overflows float16")
    assert not out.exists() and _no_temp(tmp_path)


@pytest.mark.parametrize("flag,value", [("--lam", "inf"), ("--rcond", "inf"), ("--lam", "nan"),
                                        ("--ridge", "nan"), ("--eta-preserve", "inf"), ("--rcond", "2")])
def test_erase_nonfinite_options_are_refused(flag, value, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    _fails(capsys, _erase(tiny_checkpoints["sd1"], tokenizer_dir, out, flag, value), flag)
    assert not out.exists()


def test_api_merge_refuses_nonfinite_weights(tiny_models, lora_files):
    from weightsmith.core.lora_read import load_lora
    from weightsmith.core.merge import merge

    m = tiny_models["sd1"]
    loras = [load_lora(p, m) for p in lora_files]
    for w in (float("nan"), float("inf")):
        for method in ("linear", "iteris"):
            with pytest.raises(WeightsmithError, match="finite"):
                merge(m, loras, method, weights=[w, 1.0])


def test_writers_never_write_nonfinite_tensors(tiny_models, tmp_path):
    from weightsmith.core.edit import Edit
    from weightsmith.core.lora_write import save_lora
    from weightsmith.core.model_io import atomic_save_file

    with pytest.raises(WeightsmithError, match="x.weight"):
        atomic_save_file({"ok": torch.ones(2), "x.weight": torch.tensor([1.0, float("inf")])}, tmp_path / "a.safetensors")
    m = tiny_models["sd1"]
    n = m.unet_cross_attention_names()[0] + ".to_k"
    d = torch.zeros(m.weight(n).shape)
    d[0, 0] = float("nan")
    with pytest.raises(WeightsmithError, match="to_k"):
        save_lora(Edit("sd1", m.unet_config, {n: d}), tmp_path / "b.safetensors")
    assert not list(tmp_path.iterdir())


def test_nan_message_names_the_key_as_the_file_spells_it(tiny_models, tmp_path):
    from weightsmith.core.lora_read import load_lora

    m = tiny_models["sd1"]
    t, _ = random_lora(m, groups=("attn",), rank=2, seed=1)
    k = next(k for k in sorted(t) if k.endswith(".lora_up.weight"))
    t[k] = torch.full_like(t[k], float("nan"))
    save_file(t, str(tmp_path / "nan.safetensors"))
    with pytest.raises(WeightsmithError) as e:
        load_lora(tmp_path / "nan.safetensors", m)
    assert k in str(e.value) and "lora_linear_layer" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# 4. option validation
@pytest.mark.parametrize("field,value", [("alpha1", -1.0), ("svd_rank", -2), ("svd_rank", 0), ("samples", 0),
                                         ("ties_density", 0.0), ("ties_density", -1.0), ("iterations", -3),
                                         ("steps", 0), ("batch_size", 0), ("latent_size", 0), ("dare_p", 1.0),
                                         ("tol", float("nan")), ("reg_coef", 2.0), ("untouched", "all")])
def test_merge_options_validate(field, value, tiny_models, lora_files):
    from weightsmith.core.merge import MergeOptions, merge

    MergeOptions().validate()                                   # the defaults are valid
    o = MergeOptions(**{field: value})
    with pytest.raises(WeightsmithError, match=field):
        o.validate()
    with pytest.raises(WeightsmithError, match=field):          # and merge() checks them
        merge(tiny_models["sd1"], lora_files, "svd" if field == "svd_rank" else "linear", options=o)


@pytest.mark.parametrize("flag,value", [("--alpha", "-1"), ("--rank", "-2"), ("--rank", "0"), ("--samples", "0"),
                                        ("--density", "0"), ("--iterations", "-3"), ("--steps", "0"),
                                        ("--batch-size", "0"), ("--latent-size", "0")])
def test_merge_cli_refuses_bad_options_before_loading(flag, value, tiny_checkpoints, tokenizer_dir, lora_files,
                                                      tmp_path, capsys, monkeypatch):
    import weightsmith.core.model_io as mio

    monkeypatch.setattr(mio, "load_model", lambda *a, **k: pytest.fail("loaded the model before validating"))
    out = tmp_path / "o.safetensors"
    _fails(capsys, _merge(tiny_checkpoints["sd1"], tokenizer_dir, lora_files, out, flag, value), flag)
    assert not out.exists()


@pytest.mark.parametrize("extra,words", [
    (["--te-layers", "20-30", "--method", "erasepro"], "selects no layer"),
    (["--max-pad", "-5"], "--max-pad"),
    (["--eta-preserve", "-10"], "eta_preserve"),
    (["--clip-skip", "-4"], "clip-skip"),
    (["--preserve", "van gogh"], "both a target and a preserve"),
    (["--template", "a {x}"], "exactly one {}"),
    (["--template", "{} and {}"], "exactly one {}"),
    (["--template", "no placeholder"], "exactly one {}"),
])
def test_erase_option_holes_are_refused(extra, words, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    argv = _erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora")
    if "--max-pad" in extra:
        i = argv.index("--max-pad")
        del argv[i:i + 2]
    _fails(capsys, argv + extra, words)
    assert not out.exists()


def test_partly_outside_te_layers_warns(tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert main(_erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora", "--te-layers", "2-30")) == 0
    assert "reaches past the layers" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# 5. file-system faults: one line, no temp file, nothing half-written
def test_out_that_is_a_folder_is_refused(tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    d = tmp_path / "adir.safetensors"
    d.mkdir()
    _fails(capsys, _erase(tiny_checkpoints["sd1"], tokenizer_dir, d, "--format", "lora"), "existing folder")
    assert not list(d.iterdir())


@pytest.mark.parametrize("which", ["output", "report"])
@pytest.mark.parametrize("command", ["erase", "merge"])
def test_full_disk_gives_one_line_and_no_temp_file(which, command, tiny_checkpoints, tokenizer_dir, lora_files,
                                                   tmp_path, capsys, monkeypatch):
    real = os.replace

    def full(src, dst, *a, **k):
        if str(dst).endswith(".json" if which == "report" else ".safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    out, rep = tmp_path / "o.safetensors", tmp_path / "o.json"
    argv = (_erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora", "--report", rep)
            if command == "erase" else _merge(tiny_checkpoints["sd1"], tokenizer_dir, lora_files, out, "--report", rep))
    err = _fails(capsys, argv, "disk is full")
    assert _no_temp(tmp_path)
    assert not rep.exists()
    if which == "report":                                      # the output is complete and says so
        assert "was written and is complete, but the report was not" in err
        assert load_file(str(out))
    else:
        assert not out.exists()


def test_permission_denied_at_write_gives_one_line(tiny_checkpoints, tokenizer_dir, tmp_path, capsys, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), k.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    out = tmp_path / "o.safetensors"
    _fails(capsys, _erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora"), "permission denied")
    assert not out.exists()


def test_ctrl_c_after_the_output_was_written_says_so(tiny_checkpoints, tokenizer_dir, tmp_path, capsys, monkeypatch):
    import weightsmith.core.erase.cli as ecli

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ecli, "print_summary", interrupt)
    out = tmp_path / "o.safetensors"
    err = _fails(capsys, _erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora"), str(out),
                 "written completely", rc=130)
    assert "nothing was written" not in err and out.exists()


def test_ctrl_c_during_start_up_is_one_line(capsys, monkeypatch):
    import weightsmith.core.cli as cli

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupt)
    _fails(capsys, ["erase"], "interrupted; nothing was written", rc=130)


# ----------------------------------------------------------------------------------------------
# 6. file modes follow the umask (as a plain open() would), not mkstemp's 0600
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_umask_mode(umask, tiny_models, tiny_checkpoints, tokenizer_dir, tmp_path, capsys,
                                   diffusers_folder):
    old = os.umask(umask)
    try:
        ck = tmp_path / "ck.safetensors"
        lo, rep = tmp_path / "lo.safetensors", tmp_path / "lo.json"
        args = _erase(tiny_checkpoints["sd1"], tokenizer_dir, ck)
        assert main(args) == 0
        assert main(_erase(tiny_checkpoints["sd1"], tokenizer_dir, lo, "--format", "lora", "--report", rep)) == 0
        src = diffusers_folder(tiny_models["sd1"], tmp_path / "dm")
        dout = tmp_path / "dm-edited"
        assert main(["erase", "--model", str(src), "--target", "cat", "--anchor", "dog", "--no-expand", "--quiet",
                     "--out", str(dout)]) == 0
        ref = tmp_path / "plain"
        ref.write_bytes(b"x")                                   # what a normal write gives
        want = stat.S_IMODE(ref.stat().st_mode)
        assert want == 0o666 & ~umask
        for p in (ck, lo, rep, dout / "unet" / "diffusion_pytorch_model.safetensors"):
            assert stat.S_IMODE(p.stat().st_mode) == want, p
        assert stat.S_IMODE(dout.stat().st_mode) == 0o777 & ~umask
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------------------------
# 7. smaller items
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


def test_bad_lora_weight_suffix_is_named(tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys):
    _fails(capsys, _merge(tiny_checkpoints["sd1"], tokenizer_dir, [f"{lora_files[0]}:abc"], tmp_path / "o.safetensors"),
           "'abc'", "not a number")


def test_same_lora_twice_warns(tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert main(_merge(tiny_checkpoints["sd1"], tokenizer_dir, [lora_files[0], lora_files[0]], out)) == 0
    assert "more than once" in capsys.readouterr().err


def test_prompts_with_only_a_file_is_refused(tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys):
    _fails(capsys, _merge(tiny_checkpoints["sd1"], tokenizer_dir, lora_files, tmp_path / "o.safetensors",
                          "--prompts", lora_files[0]), "gives no prompts")


@pytest.mark.parametrize("command", ["erase", "merge"])
def test_missing_tokenizer_folder_is_refused(command, tiny_checkpoints, lora_files, tmp_path, capsys):
    missing = tmp_path / "no-such-tokenizer"
    out = tmp_path / "o.safetensors"
    argv = (_erase(tiny_checkpoints["sd1"], missing, out, "--format", "lora") if command == "erase"
            else _merge(tiny_checkpoints["sd1"], missing, lora_files, out))
    _fails(capsys, argv, "--tokenizer", "does not exist")
