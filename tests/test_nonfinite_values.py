"""Non-finite values are refused where they enter (model, LoRA, options, weights) and before anything is
written; docs/reliability.md, "Non-finite values"."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.core.errors import WeightsmithError
from weightsmith.core.lab.random_loras import random_lora


def _poisoned_checkpoint(src, dst, key_part, value, dtype=None):
    sd = load_file(str(src))
    key = next(k for k in sorted(sd) if key_part in k)
    t = sd[key].clone()
    t.view(-1)[0] = value
    sd[key] = t
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    from weightsmith.core.state_files import StateFile

    save_file(sd, str(dst), metadata=StateFile(src).metadata)
    return key


@pytest.mark.parametrize("case", ["te_nan_checkpoint", "to_k_nan_diff", "unedited_inf_checkpoint"])
def test_nonfinite_model_weights_are_refused_naming_the_tensor(
    cli_cases, case, tiny_checkpoints, tokenizer_dir, tmp_path, capsys
):
    src = tiny_checkpoints["sd1"]
    bad = tmp_path / "bad.safetensors"
    part, val, fmt = {
        "te_nan_checkpoint": ("layers.0.self_attn.k_proj.weight", float("nan"), "checkpoint"),
        "to_k_nan_diff": ("attn2.to_k.weight", float("nan"), "diff"),
        "unedited_inf_checkpoint": ("diffusion_model.input_blocks.0.0.weight", float("inf"), "checkpoint"),
    }[case]
    key = _poisoned_checkpoint(src, bad, part, val)
    out = tmp_path / "out.safetensors"
    err = cli_cases.fails(capsys, cli_cases.erase(bad, tokenizer_dir, out, "--format", fmt), "NaN or infinite")
    named = {
        "te_nan_checkpoint": "layers.0.self_attn.k_proj",
        "to_k_nan_diff": "attn2.to_k",
        "unedited_inf_checkpoint": key,
    }[case]
    assert named in err
    assert not out.exists() and cli_cases.no_temp(tmp_path)


def test_fp16_overflow_of_a_merge_is_refused(cli_cases, tiny_models, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    ck16 = tmp_path / "fp16.safetensors"
    _poisoned_checkpoint(tiny_checkpoints["sd1"], ck16, "input_blocks.0.0.weight", 0.0, dtype=torch.float16)
    big = tmp_path / "big.safetensors"
    t, meta = random_lora(tiny_models["sd1"], groups=("attn",), rank=2, seed=5, strength=1e6)
    save_file(t, str(big), metadata=meta)
    out = tmp_path / "merged.safetensors"
    cli_cases.fails(
        capsys, cli_cases.merge(ck16, tokenizer_dir, [big], out, "--format", "checkpoint"), "overflows float16"
    )
    assert not out.exists() and cli_cases.no_temp(tmp_path)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lam", "inf"),
        ("--rcond", "inf"),
        ("--lam", "nan"),
        ("--ridge", "nan"),
        ("--eta-preserve", "inf"),
        ("--rcond", "2"),
    ],
)
def test_erase_nonfinite_options_are_refused(cli_cases, flag, value, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    cli_cases.fails(capsys, cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, flag, value), flag)
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
        atomic_save_file(
            {"ok": torch.ones(2), "x.weight": torch.tensor([1.0, float("inf")])}, tmp_path / "a.safetensors"
        )
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


@pytest.mark.parametrize("part", ["layers.0.self_attn.k_proj.weight", "input_blocks.1.0.in_layers.2.weight"])
def test_nonfinite_model_weights_are_named_before_an_iteris_merge_samples(
    part, cli_cases, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys, monkeypatch
):
    """(Was "INTERNAL ASSERT FAILED, please report a bug to PyTorch" from torch.linalg.)"""
    import weightsmith.core.merge.api as api

    bad = tmp_path / "bad.safetensors"
    _poisoned_checkpoint(tiny_checkpoints["sd1"], bad, part, float("nan"))
    monkeypatch.setattr(api, "make_samples", lambda *a, **k: pytest.fail("sampled before checking the model"))
    out = tmp_path / "o.safetensors"
    argv = cli_cases.merge(bad, tokenizer_dir, lora_files, out)
    argv[argv.index("concat")] = "iteris"
    err = cli_cases.fails(capsys, argv, "NaN or infinite", "IterIS")
    assert ("k_proj" if "k_proj" in part else "resnets.0.conv1") in err
    assert not out.exists() and cli_cases.no_temp(tmp_path)
