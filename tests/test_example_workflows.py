"""The shipped example workflows load in the pack as it is: ComfyUI fills a node's widgets from the
saved ``widgets_values`` by position, so every value must fit the widget at its position (a widget
added in the middle of a node's inputs shifts the values of every workflow saved before it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
FILES: list = []  # what the stand-in folder_paths lists


@pytest.fixture(autouse=True)
def folder_paths(monkeypatch):
    """A stand-in for ComfyUI's ``folder_paths`` (the LoRA-list widgets read it)."""
    import sys
    import types

    fp = types.ModuleType("folder_paths")
    fp.get_filename_list = lambda kind: FILES
    monkeypatch.setitem(sys.modules, "folder_paths", fp)


def widgets(cls) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's widget inputs in ComfyUI's order (required, then optional)."""
    spec = cls.INPUT_TYPES()
    out = []
    for group in ("required", "optional"):
        for name, entry in spec.get(group, {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                out.append((name, kind, opts))
                # the front end adds a "control after generate" value after an INT seed (by option or name)
                if kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
                    out.append((name + " (control)", ["fixed", "increment", "decrement", "randomize"], {}))
    return out


def fits(value, kind, opts) -> bool:
    if kind is FILES:  # a file list the user's folders fill: any name, or none picked yet (the user picks)
        return value is None or isinstance(value, str)
    if isinstance(kind, list):
        return value in kind
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind == "STRING":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind == "INT" and value != int(value):
        return False
    return opts.get("min", value) <= value <= opts.get("max", value)


def test_there_are_examples():
    assert len(EXAMPLES) >= 3, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_weightsmith_node_value_fits_its_widget(path):
    from weightsmith.nodes import NODE_CLASS_MAPPINGS

    graph = json.loads(path.read_text())
    ours = [n for n in graph["nodes"] if n["type"] in NODE_CLASS_MAPPINGS]
    if not ours:
        pytest.skip(f"{path.name} uses only ComfyUI's own nodes")
    for node in ours:
        ws = widgets(NODE_CLASS_MAPPINGS[node["type"]])
        values = node.get("widgets_values", [])
        assert len(values) <= len(ws), (path.name, node["type"], values, [w[0] for w in ws])
        for value, (name, kind, opts) in zip(values, ws):
            assert fits(value, kind, opts), f"{path.name}: {node['type']}.{name} = {value!r} does not fit {kind}"


def test_a_workflow_saved_before_a_new_widget_still_fits():
    """The Erase node's widgets as the first shipped workflow saved them are still the node's first widgets,
    in the same order (new ones are appended)."""
    from weightsmith.nodes import NODE_CLASS_MAPPINGS

    first = ["targets", "anchors", "method", "strength", "preserve", "layers", "token_mode", "lam"]
    first += ["prompt_expansion", "clip_skip"]
    names = [w[0] for w in widgets(NODE_CLASS_MAPPINGS["WeightsmithEraseConcepts"])]
    assert names[: len(first)] == first, names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_links_join_the_slots_they_name(path):
    """Every link [id, from node, from slot, to node, to slot, type] joins an output and an input of that
    type, and both ends list it (what the front end checks when it loads a graph)."""
    graph = json.loads(path.read_text())
    nodes = {n["id"]: n for n in graph["nodes"]}
    for lid, src, s_slot, dst, d_slot, kind in graph["links"]:
        out, inp = nodes[src]["outputs"][s_slot], nodes[dst]["inputs"][d_slot]
        assert out["type"] == kind and inp["type"] == kind, (path.name, lid)
        assert lid in (out.get("links") or []) and inp.get("link") == lid, (path.name, lid)
    linked = {lid for lid, *_ in graph["links"]}
    for n in graph["nodes"]:
        for i in n.get("inputs", []):
            assert i.get("link") is None or i["link"] in linked, (path.name, n["id"], i["name"])
    assert graph["last_link_id"] >= max(linked) and graph["last_node_id"] >= max(nodes)
