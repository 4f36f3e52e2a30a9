"""Every option's declared rule (core/optspec.py: type, lo/hi, choices) is what every path enforces
(issue 37, "Options and the API"): the options dataclasses, the CLI before any model loads, the quick
settings, the hosts' widgets; and the Python API checks its arguments with the CLI's sentences."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.core.cli import main
from weightsmith.core.erase.options import EraseOptions
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.merge.options import MergeOptions, with_quick
from weightsmith.core.optspec import from_values, specs

CLASSES = (EraseOptions, MergeOptions)


def _outside(s):
    """Values just outside the declared range of option ``s`` (computed from lo/hi alone)."""
    out = []
    if s.lo is not None:
        out.append(s.lo if s.lo_open else (s.lo - 1 if s.kind == "int" else s.lo - max(abs(s.lo), 1e-3) * 0.5))
    if s.hi is not None:
        out.append(s.hi if s.hi_open else (s.hi + 1 if s.kind == "int" else s.hi + max(abs(s.hi), 1e-3) * 0.5))
    return out


def _numeric(cls):
    return [(cls, n, s) for n, s in specs(cls).items() if s.kind in ("int", "float")]


@pytest.mark.parametrize(
    "cls,name,s",
    [t for c in CLASSES for t in _numeric(c)],
    ids=lambda x: getattr(x, "name", getattr(x, "__name__", str(x))),
)
def test_every_declared_bound_is_enforced(cls, name, s):
    for v in _outside(s):
        with pytest.raises(WeightsmithError) as e:
            cls(**{name: v}).validate()
        msg = str(e.value)
        assert name in msg and repr(v) in msg and (s.flag is None or s.flag in msg), msg
    for v in (s.lo, s.hi):  # a closed bound itself is allowed
        closed = v is not None and not (s.lo_open if v == s.lo else s.hi_open)
        if closed and not (cls is EraseOptions and name == "exact_subspace"):
            cls(**{name: v}).validate()
    bad = "1" if s.kind == "float" else 1.5  # the declared type: text is no number, 1.5 no whole number
    with pytest.raises(WeightsmithError, match=name):
        cls(**{name: bad}).validate()
    if s.kind == "float":
        with pytest.raises(WeightsmithError, match="finite number"):
            cls(**{name: math.inf}).validate()


@pytest.mark.parametrize("cls,name", [(c, n) for c in CLASSES for n, s in specs(c).items() if s.choices])
def test_every_declared_choice_is_enforced(cls, name):
    s = specs(cls)[name]
    bad = ("nonsense",) if s.kind == "tuple" else "nonsense"
    with pytest.raises(WeightsmithError) as e:
        cls(**{name: bad}).validate()
    assert name in str(e.value) and "nonsense" in str(e.value) and all(c in str(e.value) for c in s.choices)
    cls(**{name: (s.choices[0],) if s.kind == "tuple" else s.choices[0]}).validate()


def test_the_sentences_of_the_issue():
    for kw, words in (
        ({"samples": 1_000_000_000}, "samples (--samples) must be >= 1 and at most 64"),
        ({"iterations": 1_000_000_000, "tol": 0.0}, "iterations (--iterations) must be >= 0 and at most 50"),
        ({"seed": 2**64}, "seed (--seed) must be >= 0 and at most 2147483647"),
        ({"seed": True}, "seed (--seed) must be a whole number"),
        ({"adaptive_lambda": "no"}, "adaptive_lambda must be True or False"),
    ):
        with pytest.raises(WeightsmithError, match=r"^" + words.replace("(", r"\(").replace(")", r"\)")):
            MergeOptions(**kw).validate()
    with pytest.raises(WeightsmithError, match="concept_type"):
        EraseOptions(concept_type="animal").validate()


def test_quick_settings_and_host_values_go_through_the_same_rule():
    with pytest.raises(WeightsmithError, match=r"samples \(--samples\)"):
        from_values(MergeOptions, with_quick({"samples": 65}, True))
    with pytest.raises(WeightsmithError, match=r"steps \(--steps\)"):
        from_values(MergeOptions, {"steps": 101}, where="Weightsmith node")


def test_comfy_widgets_offer_the_declared_range():
    from weightsmith.nodes.erase_node import WeightsmithEraseConcepts
    from weightsmith.nodes.merge_nodes import WeightsmithIterISMerge

    for node, cls, names in (
        (
            WeightsmithIterISMerge,
            MergeOptions,
            ("iterations", "samples", "steps", "seed", "resolution", "max_memory_gb"),
        ),
        (WeightsmithEraseConcepts, EraseOptions, ("lam",)),
    ):
        t = node.INPUT_TYPES()
        inputs = {**t["required"], **t.get("optional", {})}
        for n in names:
            s = specs(cls)[n]
            assert (inputs[n][1].get("min"), inputs[n][1].get("max")) == (s.lo, s.hi), n


# -- the CLI: refused before any model loads ----------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    import weightsmith.core.model_io as mio

    monkeypatch.setattr(mio, "load_model", lambda *a, **k: pytest.fail("loaded the model before validating"))


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--samples", "1000000000"], "samples (--samples) must be >= 1 and at most 64, got 1000000000."),
        (["--iterations", "1000000000", "--tol", "0"], "iterations (--iterations) must be >= 0 and at most 50"),
        (["--seed", str(2**64)], f"seed (--seed) must be >= 0 and at most 2147483647, got {2**64}."),
        (["--speed", "quick", "--samples", "65"], "samples (--samples) must be >= 1 and at most 64"),
    ],
)
def test_merge_cli_refuses_out_of_range_options_before_loading(extra, words, tmp_path, capsys, no_loading):
    model, lora = tmp_path / "m.safetensors", tmp_path / "a.safetensors"
    model.write_bytes(b"x")
    lora.write_bytes(b"x")
    out = tmp_path / "o.safetensors"
    rc = main(
        [
            "merge",
            "--model",
            str(model),
            "--lora",
            str(lora),
            "--lora",
            str(lora),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and words in err and "Traceback" not in err, err
    assert not out.exists()


def test_erase_cli_refuses_a_declared_bound_and_a_bad_rank_before_loading(tmp_path, capsys, no_loading):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    out = tmp_path / "o.safetensors"
    base = ["erase", "--model", str(model), "--target", "cat", "--out", str(out), "--quiet"]
    assert main(base + ["--lam", "1000"]) == 2
    assert "lam (--lam) must be >= 1e-06 and at most 100, got 1000.0." in capsys.readouterr().err
    assert main(base + ["--format", "lora", "--rank", "0"]) == 2
    assert "--rank must be a positive integer" in capsys.readouterr().err
    assert not out.exists()


# -- the Python API: the CLI's sentences --------------------------------------------------------
@pytest.mark.parametrize(
    "targets,words",
    [
        ([None], "every --target must be text, got None"),
        ([3], "every --target must be text, got 3"),
        ([], "no target concept given"),
        ([" "], "a target concept is empty"),
        (None, "no target concept given"),
        (5, "concepts for --target must be text or a list of texts"),
    ],
)
def test_erase_api_checks_its_targets(tiny_models, targets, words):
    from weightsmith.core.erase import erase

    with pytest.raises(WeightsmithError, match=words):
        erase(tiny_models["sd1"], targets, ["art"])
    with pytest.raises(WeightsmithError, match="every --anchor must be text"):
        erase(tiny_models["sd1"], ["cat"], [None])
    with pytest.raises(WeightsmithError, match="every --preserve must be text"):
        erase(tiny_models["sd1"], ["cat"], ["dog"], preserve=[b"x"])


def _tiny_edit(model):
    from weightsmith.core.edit import Edit

    n = model.unet_cross_attention_names()[0] + ".to_k"
    return Edit("sd1", model.unet_config, {n: torch.full(model.weight(n).shape, 0.01)})


@pytest.mark.parametrize(
    "kw,words",
    [
        ({"dtype": torch.int8}, "the LoRA's dtype must be a floating-point type"),
        ({"dtype": "float16"}, "the LoRA's dtype must be a floating-point type"),
        ({"rank": 1.5}, "--rank must be a positive integer"),
        ({"rank": 0}, "--rank must be a positive integer"),
        ({"rank": True}, "--rank must be a positive integer"),
    ],
)
def test_save_lora_checks_dtype_and_rank(tiny_models, tmp_path, kw, words):
    from weightsmith.core.lora_write import save_lora

    with pytest.raises(WeightsmithError, match=words):
        save_lora(_tiny_edit(tiny_models["sd1"]), tmp_path / "l.safetensors", **kw)
    assert not list(tmp_path.iterdir())
    save_lora(_tiny_edit(tiny_models["sd1"]), tmp_path / "ok.safetensors", rank=1, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, "int8"])
def test_load_model_refuses_a_weights_dtype_that_is_not_floating(tiny_checkpoints, tokenizer_dir, dtype):
    from weightsmith.core.model_io import load_model

    with pytest.raises(WeightsmithError, match="weights precision"):
        load_model(tiny_checkpoints["sd1"], tokenizer=tokenizer_dir, weights_dtype=dtype)
