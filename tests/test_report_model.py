"""One report model for both hosts (issue 13): the ComfyUI text and the A1111 table are built from
the same rows, recomputed here from the edit and the model's weights."""

from __future__ import annotations

import torch

from weightsmith.core import report
from weightsmith.core.edit import Edit


class _Model:
    def __init__(self, weights):
        self.weights = weights

    def weight(self, name):
        return self.weights[name]


NAMES = [
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "text_encoder.text_model.encoder.layers.10.self_attn.k_proj",
    "text_encoder.text_model.encoder.layers.2.self_attn.k_proj",
]


def _edit(report_dict):
    g = torch.Generator().manual_seed(0)
    names = NAMES
    deltas = {n: torch.randn(6, 5, generator=g) for n in names}
    weights = {n: torch.randn(6, 5, generator=g) * 3 for n in names}
    return Edit("sd1", {}, deltas, report=report_dict), _Model(weights), names


def test_rows_recompute_norms_and_keep_both_residual_shapes():
    erase, model, names = _edit(
        {
            "method": "erasepro",
            "stages": [{"layer": NAMES[1], "stage": "te1", "residual_before": 0.5, "residual_after": 0.01}],
        }
    )
    rows = report.rows(erase, report.relative_changes(erase, model))
    assert [r["name"] for r in rows] == [names[2], names[1], names[0]]  # TE by layer number, then UNet
    for r in rows:
        d, w = erase.deltas[r["name"]], model.weights[r["name"]]
        assert abs(r["delta_rel"] - float(d.norm() / w.norm())) < 1e-6
        assert abs(r["delta_fro"] - float(d.norm())) < 1e-5
    assert rows[1]["stage"] == "te1" and rows[1]["residual_before"] == 0.5 and rows[1]["residual_after"] == 0.01
    # a merge reports {module: residual}; the table shows it (the tab used to drop merge residuals)
    merge, model, names = _edit({"method": "iteris", "residuals": {NAMES[0]: 0.25, NAMES[1]: None}})
    table = report.table(report.rows(merge, report.relative_changes(merge, model)))
    assert len(table[0]) == len(report.TABLE_HEADERS)
    by = {r[0]: r for r in table}
    assert by[names[0]][5] == 0.25 and by[names[0]][4] is None and by[names[2]][5] is None


def test_both_hosts_render_the_same_rows():
    from weightsmith.a1111_extension.backend import layer_table, report_rows
    from weightsmith.nodes.common import format_report

    edit, model, names = _edit({"method": "iteris", "residuals": {NAMES[0]: 0.25}})
    rel = report.relative_changes(edit, model)
    a1111 = layer_table(report_rows(edit, model))
    text = format_report(edit, rel, "T")
    lines = [ln for ln in text.splitlines() if "|dW|/|W|" in ln]
    assert [ln.split(":")[0] for ln in lines] == [r[0] for r in a1111]
    for ln, r in zip(lines, a1111):
        assert f"{r[3]:.3e}" == ln.split("= ")[1][:9]
    assert "residual 2.500e-01" in lines[-1]
    pic = report.picture(report.rows(edit, rel), "T", report.footer(edit, 3))
    assert pic.size[1] == report.picture(report.rows(edit, rel)[:2], "T", report.footer(edit, 2)).size[1] + report.ROW
