"""Every option is declared once in core and the three front ends show the same defaults (issue 13).

The CLI is checked through its real parser, the ComfyUI nodes through their ``INPUT_TYPES``, the
A1111 tab by running its real ``build_ui`` against a recording stand-in for ``gradio`` (the
components it creates and the values they start with)."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
import types

import pytest

from weightsmith.core.erase.options import EraseOptions
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.merge.options import MergeOptions, machine_is_cpu, with_quick
from weightsmith.core.optspec import from_values, parse_layer_range, spec, specs


def test_option_modules_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; "
        "from weightsmith.core.erase.options import EraseOptions; "
        "from weightsmith.core.merge.options import QUICK, MergeOptions, machine_is_cpu, with_quick; "
        "from weightsmith.core.erase import EraseOptions as E2; from weightsmith.core.merge import MergeOptions as M2; "
        "EraseOptions().validate(); MergeOptions().validate(); "
        "print(E2 is EraseOptions and M2 is MergeOptions, "
        "[m for m in ('diffusers', 'transformers', 'numpy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True []"


def test_every_option_is_declared_with_help():
    for cls in (EraseOptions, MergeOptions):
        for name, s in specs(cls).items():
            f = {f.name: f for f in dataclasses.fields(cls)}[name]
            assert s.default == f.default and s.help.strip(), (cls.__name__, name)
            if s.choices is not None and not isinstance(s.default, tuple):
                assert s.default in s.choices, name
            if isinstance(s.default, (int, float)) and not isinstance(s.default, bool):
                assert (s.lo is None or s.lo <= s.default) and (s.hi is None or s.default <= s.hi), name


def test_from_values_is_strict():
    with pytest.raises(WeightsmithError, match=r"unknown option 'rcnd'.*known options: .*rcond"):
        from_values(EraseOptions, {"rcnd": 1e-3})
    with pytest.raises(WeightsmithError, match="lam"):  # validated, not only built
        from_values(EraseOptions, {"lam": -1.0})
    o = from_values(EraseOptions, {"lam": 0.25, "rcond": None})  # None keeps the default
    assert o.lam == 0.25 and o.rcond == EraseOptions().rcond
    from weightsmith.core.merge.options import ALIASES

    assert from_values(MergeOptions, {"reg_ceof": 0.3}, aliases=ALIASES).reg_coef == 0.3


def test_one_layer_range_syntax():
    assert parse_layer_range("") is None and parse_layer_range(" all ") is None
    assert parse_layer_range("3-8") == (3, 8) == parse_layer_range("3..8")
    assert parse_layer_range("5") == (5, 5)
    for bad in ("x", "8-3", "-2"):
        with pytest.raises(WeightsmithError):
            parse_layer_range(bad)
    from weightsmith.a1111_extension.ui import _layer_range
    from weightsmith.nodes.erase_node import parse_layer_range as node_parse

    assert _layer_range("2..4") == node_parse("2..4") == (2, 4)


# -- the three front ends ----------------------------------------------------------------------
def cli_erase_options() -> EraseOptions:
    from weightsmith.core.cli import build_parser
    from weightsmith.core.erase.cli import options_values

    args = build_parser().parse_args(["erase", "--model", "m.safetensors", "--target", "cat", "--out", "o.safetensors"])
    return from_values(EraseOptions, options_values(args))


def cli_merge_options(*extra) -> MergeOptions:
    from weightsmith.core.cli import build_parser
    from weightsmith.core.merge.cli import options_from_args

    a = build_parser().parse_args(
        ["merge", "--model", "m.safetensors", "--lora", "a.safetensors", "--out", "o.safetensors", *extra]
    )
    return options_from_args(a)


def comfy_defaults() -> tuple[dict, dict]:
    from weightsmith.nodes.erase_node import WeightsmithEraseConcepts
    from weightsmith.nodes.merge_nodes import WeightsmithIterISMerge

    e = WeightsmithEraseConcepts.INPUT_TYPES()
    e = {**e["required"], **e["optional"]}
    m = WeightsmithIterISMerge.INPUT_TYPES()
    m = {**m["required"], **m["optional"]}
    erase = {
        "tokens": e["token_mode"][1]["default"],
        "lam": e["lam"][1]["default"],
        "harden_rounds": e["harden_rounds"][1]["default"],
        "method": e["method"][1]["default"],
    }
    merge = {
        k: m[k][1]["default"]
        for k in ("iterations", "samples", "steps", "seed", "untouched", "max_memory_gb", "ridge_toward")
    }
    merge["method"] = m["method"][1]["default"]
    return erase, merge


class _Recorder(types.ModuleType):
    """A stand-in for ``gradio``: every component records its label and starting value."""

    def __init__(self):
        super().__init__("gradio")
        self.made = []

    def __getattr__(self, kind):
        if kind.startswith("__"):
            raise AttributeError(kind)
        rec = self

        class Component:
            def __init__(self, *args, **kw):
                self.kind, self.args, self.kw = kind, args, kw
                rec.made.append(self)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def __getattr__(self, name):  # .click(...), .change(...), .then(...)
                return lambda *a, **k: self

        return Component


def a1111_defaults() -> dict[str, object]:
    from weightsmith.a1111_extension import ui
    from weightsmith.a1111_extension.backend import Backend

    class Host(Backend):
        def list_loras(self):
            return []

        def describe(self):
            return "no model"

    fake = _Recorder()
    old = sys.modules.get("gradio")
    sys.modules["gradio"] = fake
    try:
        with contextlib.suppress(Exception):  # wiring beyond the layout may want a real gradio
            ui.build_ui(Host())
    finally:
        if old is None:
            sys.modules.pop("gradio", None)
        else:
            sys.modules["gradio"] = old
    return {c.kw["label"]: c.kw.get("value") for c in fake.made if "label" in c.kw}


def _shown(cpu: bool) -> MergeOptions:
    """What every front end starts a merge from on such a machine (core.merge.options.with_quick)."""
    return from_values(MergeOptions, with_quick({}, cpu))


def test_three_front_ends_show_the_same_defaults(monkeypatch):
    from weightsmith.a1111_extension import ui
    from weightsmith.nodes import merge_nodes

    cpu = machine_is_cpu()
    E, M = EraseOptions(), _shown(cpu)
    # CLI: what is not given follows --speed (auto: quick on a CPU)
    assert cli_erase_options() == E
    assert cli_merge_options() == (M, cpu)
    assert cli_merge_options("--speed", "thorough") == (MergeOptions(), False)
    assert cli_merge_options("--speed", "quick", "--samples", "6") == (
        from_values(MergeOptions, with_quick({"samples": 6}, True)),
        True,
    )
    # ComfyUI
    ce, cm = comfy_defaults()
    assert ce == {"tokens": E.tokens, "lam": E.lam, "harden_rounds": E.harden_rounds, "method": "erasepro"}
    assert cm == {
        "iterations": M.iterations,
        "samples": M.samples,
        "steps": M.steps,
        "seed": M.seed,
        "untouched": M.untouched,
        "max_memory_gb": M.max_memory_gb,
        "ridge_toward": M.ridge_toward,
        "method": "iteris",
    }
    # the other kind of machine: ComfyUI's widgets start from the declared defaults / the quick ones
    monkeypatch.setattr(merge_nodes, "machine_is_cpu", lambda: not cpu)
    other = _shown(not cpu)
    _, cm2 = comfy_defaults()
    assert (cm2["iterations"], cm2["samples"], cm2["steps"]) == (other.iterations, other.samples, other.steps)
    assert (cm2["iterations"], cm2["samples"], cm2["steps"]) != (cm["iterations"], cm["samples"], cm["steps"])
    monkeypatch.setattr(ui, "CPU", not cpu)
    tab2 = a1111_defaults()
    assert [tab2[spec(MergeOptions, k).label] for k in ("iterations", "samples", "steps")] == [
        other.iterations,
        other.samples,
        other.steps,
    ]
    monkeypatch.undo()
    # A1111 tab (labels come from core's declarations too)
    tab = a1111_defaults()
    for cls, name, want in (
        (EraseOptions, "tokens", E.tokens),
        (EraseOptions, "lam", E.lam),
        (EraseOptions, "eta_preserve", E.eta_preserve),
        (EraseOptions, "rcond", E.rcond),
        (EraseOptions, "harden_rounds", E.harden_rounds),
        (EraseOptions, "te_sublayers", list(E.te_sublayers)),
        (MergeOptions, "iterations", M.iterations),
        (MergeOptions, "samples", M.samples),
        (MergeOptions, "steps", M.steps),
        (MergeOptions, "seed", M.seed),
        (MergeOptions, "max_memory_gb", M.max_memory_gb),
        (MergeOptions, "ridge_toward", M.ridge_toward),
    ):
        label = spec(cls, name).label
        assert label in tab, (name, sorted(tab))
        assert tab[label] == want, (name, tab[label], want)
    assert tab["Method"] in ("erasepro", "iteris")
