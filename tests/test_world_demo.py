"""The README's main job, ``weightsmith demo``, end to end on the embedded world (small sample size)."""
import json

import pytest
from PIL import Image

from weightsmith.core.cli import main
from weightsmith.core.model_io import load_model
from weightsmith.core.world.evaluate import Sampler, erasure_metrics, merge_metrics
from weightsmith.core.world.paths import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_writes_the_report_and_its_base_rows_match_an_independent_evaluation(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--samples", "2", "--steps", "8"]) == 0
    assert "report.html" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()
    assert "erase_grid.png" in html and "merge_grid.png" in html
    for png in ("erase_grid.png", "merge_grid.png"):
        with Image.open(out / png) as im:
            assert im.width > 200 and im.height > 200
    assert set(report["erase"]["metrics"]) == {"base", "uce", "zero-residual", "erasepro"}
    assert set(report["merge"]["metrics"]) == {"base", "subject LoRA", "style LoRA", "linear", "iteris"}
    # the base-model rows, recomputed here from the shipped model with the same seeds and sampler
    model = load_model(DEFAULT_MODEL_DIR)
    sampler = Sampler(steps=8)
    ev = erasure_metrics(model, {}, n=2, sampler=sampler)["metrics"]["base"]
    mv = merge_metrics(model, {}, n=2, sampler=sampler)["metrics"]["base"]
    assert report["erase"]["metrics"]["base"] == pytest.approx(ev)
    assert report["merge"]["metrics"]["base"] == pytest.approx(mv)
    # every erase method changed weights (an identity edit would report all-zero stages)
    for name in ("uce", "zero-residual", "erasepro"):
        assert report["erase"]["stages"][name] and all(s["delta_rel_mean"] > 0 for s in report["erase"]["stages"][name])
