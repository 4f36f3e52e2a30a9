"""The ComfyUI pack's host-free parts: the root package stays light outside ComfyUI, node
definitions are complete, the report text/picture match the edit, install.py finds what is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def test_import_weightsmith_is_light_and_host_free():
    code = (
        "import sys, weightsmith; "
        "print(hasattr(weightsmith, 'NODE_CLASS_MAPPINGS'), "
        "sorted(m for m in ('torch', 'diffusers', 'transformers', 'comfy', 'folder_paths', 'weightsmith.nodes') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False []"


def test_node_definitions_are_complete():
    from weightsmith.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for nid, cls in NODE_CLASS_MAPPINGS.items():
        assert nid.startswith("Weightsmith") and cls.CATEGORY == "Weightsmith"
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        assert callable(getattr(cls, cls.FUNCTION)) and cls.DESCRIPTION


def test_layer_range_parsing():
    from weightsmith.core.errors import WeightsmithError
    from weightsmith.nodes.erase_node import parse_layer_range

    assert parse_layer_range("") is None and parse_layer_range("auto") is None
    assert parse_layer_range("3-8") == (3, 8) and parse_layer_range("2..4") == (2, 4)
    assert parse_layer_range(" 5 ") == (5, 5)
    for bad in ("x", "8-3", "-1"):
        with pytest.raises(WeightsmithError):
            parse_layer_range(bad)


def test_report_text_and_picture_follow_the_edit():
    from weightsmith.core.edit import Edit
    from weightsmith.nodes.common import format_report, report_picture

    names = [
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "text_encoder.text_model.encoder.layers.10.self_attn.k_proj",
        "text_encoder.text_model.encoder.layers.2.self_attn.k_proj",
    ]
    deltas = {n: torch.full((4, 4), float(i + 1)) for i, n in enumerate(names)}
    rep = {
        "method": "erasepro",
        "targets": ["cat"],
        "stages": [{"layer": names[1], "residual_before": 0.5, "residual_after": 0.01}],
    }
    edit = Edit("sd1", {}, deltas, report=rep)
    rel = {n: float(d.norm() / 8.0) for n, d in deltas.items()}
    text = format_report(edit, rel, "T")
    body = [ln for ln in text.splitlines() if "|dW|/|W|" in ln]
    assert [ln.split(":")[0] for ln in body] == [names[2], names[1], names[0]]  # TE in layer order, then UNet
    assert f"{rel[names[0]]:.3e}" in body[2] and "5.000e-01 -> 1.000e-02" in body[1]
    img = report_picture(edit, rel, "T")
    assert img.shape[0] == 1 and img.shape[3] == 3 and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    more = report_picture(Edit("sd1", {}, {**deltas, "unet.x.to_v": torch.ones(2, 2)}), rel, "T")
    assert more.shape[1] == img.shape[1] + 16  # one 16-pixel row per module


def test_install_py_reports_only_missing_requirements(install_py):
    reqs = list(install_py.requirements())
    assert reqs and not any(r.lower().startswith("torch") for r in reqs)
    assert install_py.missing(reqs) == []
    assert install_py.missing(["surely-not-installed-pkg-ws>=1"]) == ["surely-not-installed-pkg-ws>=1"]
