"""``weightsmith bench merge --sweep`` on the embedded world: each row is the merge its setting names,
judged as the world's own evaluation judges it."""

import json

import pytest

from weightsmith.core.cli import main
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.lab.merge_sweep import SWEEP, settings_named
from weightsmith.core.lora_read import load_lora
from weightsmith.core.merge import MergeOptions, merge
from weightsmith.core.model_io import load_model
from weightsmith.core.world.evaluate import Sampler, merge_metrics, merge_sample_prompts, pair_paths
from weightsmith.core.world.paths import DEFAULT_MODEL_DIR

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_quick_sweep_rows_match_the_merges_they_name_judged_independently(capsys):
    assert main(["bench", "merge", "--sweep", "--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["metrics"]) == ["base", "subject only", "style only", "linear", "iterations 0"]
    assert out["settings"]["iterations 0"] == {"method": "iteris", "options": {"iterations": 0}}
    # the same two merges, built here from the shipped LoRAs with the options the rows name
    model = load_model(DEFAULT_MODEL_DIR)
    loras = [load_lora(p, model) for p in pair_paths("interfering")]
    opts = MergeOptions(iterations=0, samples=2, steps=2)
    it0 = merge(model, loras, method="iteris", options=opts, prompts=merge_sample_prompts(2, "interfering"))
    assert it0.report["iterations"] == 0
    models = {"linear": merge(model, loras, method="linear").apply(model), "iterations 0": it0.apply(model)}
    ev = merge_metrics(model, models, n=2, sampler=Sampler(steps=4), pair="interfering")["metrics"]
    for name in models:
        for k, m in ev[name].items():
            assert out["metrics"][name][k]["n"] == m["n"] == 2
            got = out["metrics"][name][k]
            assert (got.get("rate", got.get("mean"))) == pytest.approx(m.get("rate", m.get("mean")), abs=1e-9), (
                name,
                k,
            )


def test_sweep_settings_are_valid_options_and_unknown_labels_are_refused():
    assert len({s[0] for s in SWEEP}) == len(SWEEP)
    for _, _method, fields in SWEEP:
        MergeOptions(**fields).validate()  # every row is a valid option set
    with pytest.raises(WeightsmithError, match="unknown sweep setting"):
        settings_named(["linear", "no such row"])
