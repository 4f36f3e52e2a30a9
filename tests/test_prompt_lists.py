"""The one rule for concept and prompt lists typed as text (core/prompt_lists.py; docs/method.md,
"Lists in text fields"), stated with examples, then through each front end's own entry point: the
A1111/Forge tab (Workbench), the ComfyUI nodes and the CLI give the same list for the same intended
input. The solver is a recording stand-in (tests/conftest.py): what is checked is the list it receives."""

import sys
import types

import pytest

from weightsmith.core.prompt_lists import a1111_list, a1111_prompt_table, cli_list, comfy_list, split_items


# ---------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize(
    "text, expect",
    [
        ("Van Gogh\nPicasso", ["Van Gogh", "Picasso"]),  # a line break separates
        ("Van Gogh; Picasso", ["Van Gogh", "Picasso"]),  # so does ';'
        ("  Van Gogh \n\n ;; Picasso ;\n", ["Van Gogh", "Picasso"]),  # items stripped, empty ones dropped
        ("a cat, in a hat", ["a cat, in a hat"]),  # a comma belongs to the item
        ("Smith, John\nMonet", ["Smith, John", "Monet"]),
        ('"AT&T; Inc."; Monet', ["AT&T; Inc.", "Monet"]),  # no split inside double quotes
        ('a sign saying "hi"; a dog', ['a sign saying "hi"', "a dog"]),  # a quote inside an item is kept
        ("", []),
        (None, []),
    ],
)
def test_the_rule(text, expect):
    assert split_items(text) == expect == comfy_list(text)


def test_a1111_concept_boxes_also_split_at_commas_outside_quotes():
    assert a1111_list("Monet, Picasso") == ["Monet", "Picasso"]  # as the tab always documented
    assert a1111_list("Monet, Picasso\nVan Gogh; Klimt") == ["Monet", "Picasso", "Van Gogh", "Klimt"]
    assert a1111_list('"Smith, John", Monet') == ["Smith, John", "Monet"]
    assert a1111_list("1, 0.5") == ["1", "0.5"] and a1111_list(" , ") == []
    assert a1111_list(["a, b", " c "]) == ["a, b", "c"]  # a list is already split


def test_a1111_sample_prompts_are_a_table_of_lines():
    text = "a cat, sitting | a dog; a bird\n\nzx style, city"
    assert a1111_prompt_table(text) == [["a cat, sitting", "a dog", "a bird"], ["zx style, city"]]
    assert a1111_prompt_table("") == [] and a1111_prompt_table(" | \n") == []


def test_cli_values_split_at_semicolons_and_an_empty_value_keeps_its_place():
    assert cli_list(["Van Gogh; Picasso", "Smith, John"]) == ["Van Gogh", "Picasso", "Smith, John"]
    assert cli_list(["", "art"]) == ["", "art"]  # --anchor "" --anchor art: unconditional, then art
    assert cli_list([]) == [] and cli_list(None) == []


# ---------------------------------------------------------------------------------------------- front ends
INTENDED = ["Smith, John", "Monet", "a cat, in a hat"]
A1111_TEXT = '"Smith, John"\nMonet; "a cat, in a hat"'
COMFY_TEXT = "Smith, John\nMonet\na cat, in a hat"
CLI_ARGS = ["--target", "Smith, John", "--target", "Monet; a cat, in a hat"]
SHARED = "Smith, John\nMonet; a cat, in a hat"  # means the same in ComfyUI and the CLI


@pytest.fixture()
def tiny_model():
    from weightsmith.core.lab.random_models import build_random_model

    return build_random_model("sd1", "tiny", seed=3)


def _a1111_targets(tmp_path, model, recorder, targets):
    from weightsmith.a1111_extension.backend import StandaloneBackend, Workbench

    b = StandaloneBackend(tmp_path / "unused", tmp_path / "loras", tmp_path / "ckpts")
    b._model = model
    Workbench(b).compute_erase(targets, "art", "", "uce", {})
    return recorder.calls[-1]["targets"]


def _comfy_targets(monkeypatch, model, recorder, targets):
    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = lambda: None
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = lambda n: types.SimpleNamespace(update_absolute=lambda *a: None)
    comfy.model_management, comfy.utils = mm, utils
    for name, mod in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    from weightsmith.nodes import comfy_adapter as ca
    from weightsmith.nodes.erase_node import WeightsmithEraseConcepts

    monkeypatch.setattr(ca, "sdmodel_from_comfy", lambda m, c, **k: model)
    monkeypatch.setattr(ca, "apply_edit", lambda m, c, edit, s: (m, c))
    WeightsmithEraseConcepts().run("MODEL", "CLIP", targets, "art", "uce", 1.0)
    return recorder.calls[-1]["targets"]


def _cli_targets(tmp_path, monkeypatch, model, recorder, args):
    import weightsmith.core.erase.pipeline as pipeline
    import weightsmith.core.model_io as model_io
    from weightsmith.core.cli import main

    (tmp_path / "model").mkdir(exist_ok=True)
    monkeypatch.setattr(model_io, "load_model", lambda *a, **k: model)
    real, seen = pipeline.erase, []

    def recorded(m, targets, *a, **k):  # the CLI imports the pipeline's erase: record, then solve
        seen.append(list(targets))
        return real(m, targets, *a, **k)

    monkeypatch.setattr(pipeline, "erase", recorded)
    out = tmp_path / f"out{len(recorder.calls)}-{len(list(tmp_path.iterdir()))}.safetensors"
    assert (
        main(
            [
                "erase",
                "--model",
                str(tmp_path / "model"),
                *args,
                "--anchor",
                "art",
                "--method",
                "uce",
                "--format",
                "diff",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert len(seen) == 1, "the CLI did not reach the solver once"
    return seen[0]


def test_the_three_front_ends_give_the_same_concepts_for_the_same_intended_input(
    tmp_path, monkeypatch, tiny_model, solver_recorder
):
    a1111 = _a1111_targets(tmp_path, tiny_model, solver_recorder, A1111_TEXT)
    comfy = _comfy_targets(monkeypatch, tiny_model, solver_recorder, COMFY_TEXT)
    cli = _cli_targets(tmp_path, monkeypatch, tiny_model, solver_recorder, CLI_ARGS)
    assert a1111 == comfy == cli == INTENDED
    # the same text means the same in ComfyUI and the CLI; A1111 also splits at its commas
    assert _comfy_targets(monkeypatch, tiny_model, solver_recorder, SHARED) == INTENDED
    assert _cli_targets(tmp_path, monkeypatch, tiny_model, solver_recorder, ["--target", SHARED]) == INTENDED
    assert _a1111_targets(tmp_path, tiny_model, solver_recorder, SHARED) == [
        "Smith",
        "John",
        "Monet",
        "a cat",
        "in a hat",
    ]
    # a list without commas reads the same in all three
    plain = "Van Gogh\nPicasso; Klimt"
    assert (
        _a1111_targets(tmp_path, tiny_model, solver_recorder, plain)
        == _comfy_targets(monkeypatch, tiny_model, solver_recorder, plain)
        == _cli_targets(tmp_path, monkeypatch, tiny_model, solver_recorder, ["--target", plain])
        == ["Van Gogh", "Picasso", "Klimt"]
    )


def test_the_three_front_ends_give_the_same_sample_prompts(tmp_path, monkeypatch, tiny_model, solver_recorder):
    """Prompts of one LoRA: commas stay in a prompt everywhere; ';' separates everywhere (A1111 also '|')."""
    from weightsmith.core.merge.cli import _prompt_map

    intended = ["a photo of zq, on a table", "zq in a garden"]
    # CLI: --prompts 'p1; p2' for a LoRA
    assert _prompt_map([["a.safetensors", "a photo of zq, on a table; zq in a garden"]], ["a.safetensors"]) == [
        intended
    ]
    # ComfyUI: the LoRA Stack node's sample prompts box
    fp = types.ModuleType("folder_paths")
    fp.get_full_path_or_raise = lambda kind, name: str(tmp_path / name)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    from weightsmith.nodes.merge_nodes import WeightsmithLoraStack

    for text in ("a photo of zq, on a table\nzq in a garden", "a photo of zq, on a table; zq in a garden"):
        (stack,) = WeightsmithLoraStack().run("a.safetensors", 1.0, text)
        assert list(stack[0]["prompts"]) == intended
    # A1111: the tab's Sample prompts box (one line per LoRA), as the solver receives it
    from safetensors.torch import save_file

    from weightsmith.a1111_extension.backend import StandaloneBackend, Workbench
    from weightsmith.core.lab.random_loras import random_lora

    (tmp_path / "loras").mkdir()
    for i in range(2):
        t, _ = random_lora(tiny_model, groups=("attn",), rank=2, seed=i)
        save_file(t, str(tmp_path / "loras" / f"l{i}.safetensors"))
    b = StandaloneBackend(tmp_path / "unused", tmp_path / "loras", tmp_path / "ckpts")
    b._model = tiny_model
    for text in (
        "a photo of zq, on a table; zq in a garden\nzx style",
        "a photo of zq, on a table | zq in a garden\nzx style",
    ):
        Workbench(b).compute_merge(["l0.safetensors", "l1.safetensors"], "", text, "linear", {})
        assert solver_recorder.calls[-1]["prompts"] == [intended, ["zx style"]]
