"""Options are validated before the model is loaded, naming the flag or field; docs/reliability.md,
"Options"."""

import pytest

from weightsmith.core.cli import main
from weightsmith.core.errors import WeightsmithError


@pytest.mark.parametrize(
    "field,value",
    [
        ("alpha1", -1.0),
        ("svd_rank", -2),
        ("svd_rank", 0),
        ("samples", 0),
        ("ties_density", 0.0),
        ("ties_density", -1.0),
        ("iterations", -3),
        ("steps", 0),
        ("batch_size", 0),
        ("latent_size", 0),
        ("dare_p", 1.0),
        ("tol", float("nan")),
        ("reg_coef", 2.0),
        ("untouched", "all"),
    ],
)
def test_merge_options_out_of_range_are_refused_by_validate_and_merge(field, value, tiny_models, lora_files):
    from weightsmith.core.merge import MergeOptions, merge

    MergeOptions().validate()  # the defaults are valid
    o = MergeOptions(**{field: value})
    with pytest.raises(WeightsmithError, match=field):
        o.validate()
    with pytest.raises(WeightsmithError, match=field):  # and merge() checks them
        merge(tiny_models["sd1"], lora_files, "svd" if field == "svd_rank" else "linear", options=o)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--alpha", "-1"),
        ("--rank", "-2"),
        ("--rank", "0"),
        ("--samples", "0"),
        ("--density", "0"),
        ("--iterations", "-3"),
        ("--steps", "0"),
        ("--batch-size", "0"),
        ("--latent-size", "0"),
    ],
)
def test_merge_cli_refuses_bad_options_before_loading(
    cli_cases, flag, value, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys, monkeypatch
):
    import weightsmith.core.model_io as mio

    monkeypatch.setattr(mio, "load_model", lambda *a, **k: pytest.fail("loaded the model before validating"))
    out = tmp_path / "o.safetensors"
    cli_cases.fails(capsys, cli_cases.merge(tiny_checkpoints["sd1"], tokenizer_dir, lora_files, out, flag, value), flag)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--te-layers", "20-30", "--method", "erasepro"], "selects no layer"),
        (["--max-pad", "-5"], "--max-pad"),
        (["--eta-preserve", "-10"], "eta_preserve"),
        (["--clip-skip", "-4"], "clip-skip"),
        (["--preserve", "van gogh"], "both a target and a preserve"),
        (["--template", "a {x}"], "exactly one {}"),
        (["--template", "{} and {}"], "exactly one {}"),
        (["--template", "no placeholder"], "exactly one {}"),
    ],
)
def test_erase_option_holes_are_refused(cli_cases, extra, words, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    argv = cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora")
    if "--max-pad" in extra:
        i = argv.index("--max-pad")
        del argv[i : i + 2]
    cli_cases.fails(capsys, argv + extra, words)
    assert not out.exists()


def test_te_layers_partly_outside_the_encoder_warn(cli_cases, tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert (
        main(cli_cases.erase(tiny_checkpoints["sd1"], tokenizer_dir, out, "--format", "lora", "--te-layers", "2-30"))
        == 0
    )
    assert "reaches past the layers" in capsys.readouterr().err


def test_bad_lora_weight_suffix_is_named(cli_cases, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys):
    cli_cases.fails(
        capsys,
        cli_cases.merge(tiny_checkpoints["sd1"], tokenizer_dir, [f"{lora_files[0]}:abc"], tmp_path / "o.safetensors"),
        "'abc'",
        "not a number",
    )


def test_the_same_lora_twice_warns(cli_cases, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert main(cli_cases.merge(tiny_checkpoints["sd1"], tokenizer_dir, [lora_files[0], lora_files[0]], out)) == 0
    assert "more than once" in capsys.readouterr().err


def test_prompts_naming_a_lora_but_no_prompts_are_refused(
    cli_cases, tiny_checkpoints, tokenizer_dir, lora_files, tmp_path, capsys
):
    cli_cases.fails(
        capsys,
        cli_cases.merge(
            tiny_checkpoints["sd1"], tokenizer_dir, lora_files, tmp_path / "o.safetensors", "--prompts", lora_files[0]
        ),
        "gives no prompts",
    )
