"""The tab's workbench (host-independent) on a standalone model: Merge LoRAs, stacked Apply,
Save as checkpoint, refusals. No gradio needed."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "a1111"))
from helpers import tiny_diffusers_folder  # noqa: E402


@pytest.fixture()
def bench(tmp_path):
    from weightsmith.a1111_extension.backend import StandaloneBackend, Workbench

    src = tiny_diffusers_folder(tmp_path / "model", "sd1", seed=7)
    b = StandaloneBackend(src, tmp_path / "loras", tmp_path / "ckpts")
    (tmp_path / "loras").mkdir()
    return b, Workbench(b)


def _random_loras(model, folder, n=2):
    from weightsmith.core.lab.random_loras import random_lora

    paths = []
    for i in range(n):
        t, meta = random_lora(model, groups=("attn", "te"), rank=2, seed=10 + i)
        p = folder / f"r{i}.safetensors"
        save_file(t, str(p), metadata={k: str(v) for k, v in (meta or {}).items()})
        paths.append(p)
    return paths


def test_merge_linear_save_and_apply(bench):
    from weightsmith.core.lora_read import load_lora

    b, wb = bench
    model = b.model()
    paths = _random_loras(model, b.lora_dir())
    assert b.list_loras() == ["r0.safetensors", "r1.safetensors"]
    edit, objs = wb.compute_merge(
        ["r0.safetensors", "r1.safetensors"],
        "1, 0.5",
        "a cat | a dog\na red car",
        "linear",
        {"iterations": 1, "samples": 1, "steps": 1, "seed": 0},
    )
    ref = {}
    for w, p in zip((1.0, 0.5), paths):  # linear merge = Σ w_i ΔW_i, computed here
        for n, d in load_lora(p, model).deltas().items():
            ref[n] = ref.get(n, 0) + w * d
    assert set(edit.deltas) == set(ref)
    for n in ref:
        assert torch.allclose(edit.deltas[n], ref[n], atol=1e-5), n
    names = sorted(ref)
    before = {n: model.weight(n).clone() for n in names}
    msg = wb.save_lora(edit, "merged")
    saved = load_lora(b.lora_dir() / "merged.safetensors", model)
    for n in ref:
        assert torch.allclose(saved.modules[n].delta(), ref[n], atol=1e-5), n
    assert "merged.safetensors" in msg
    wb.apply(edit)
    for n in names:
        assert torch.allclose(model.weight(n), before[n] + ref[n], atol=1e-6), n
    wb.undo()
    assert all(torch.equal(model.weight(n), before[n]) for n in names)


def test_the_tab_merges_with_the_quick_settings_no_widget_shows_on_a_cpu(bench, monkeypatch, solver_recorder):
    """Positions per sample, the widest statistics and the resolution have no widget: on a machine
    without a GPU they come from core's quick settings, elsewhere from the declarations. What is
    checked is which options reach the solver, so a recording stand-in takes the solver's place."""
    from weightsmith.core.merge import options as mo

    b, wb = bench
    _random_loras(b.model(), b.lora_dir())
    given = {"iterations": 1, "samples": 1, "steps": 1, "seed": 0, "evaluate_final": False}
    for cpu in (True, False):
        monkeypatch.setattr(mo, "machine_is_cpu", lambda cpu=cpu: cpu)
        wb.compute_merge(["r0.safetensors", "r1.safetensors"], "", "a cat\na dog", "iteris", dict(given))
        call = solver_recorder.calls[-1]
        assert call["method"] == "iteris" and len(call["loras"]) == 2 and call["prompts"] == [["a cat"], ["a dog"]]
        got = call["options"]
        for k in ("max_rows", "max_gram_dim", "resolution"):
            assert getattr(got, k) == (mo.QUICK[k] if cpu else getattr(mo.MergeOptions(), k)), (cpu, k, getattr(got, k))
        assert (got.iterations, got.samples, got.steps) == (1, 1, 1)  # what the widgets held
    assert len(solver_recorder.calls) == 2


def test_stacked_apply_and_exact_undo(bench):
    b, wb = bench
    model = b.model()
    e1 = wb.compute_erase("cat", "dog", "", "uce", {"expand_prompts": False})
    n = next(iter(e1.deltas))
    before = model.weight(n).clone()
    wb.apply(e1)
    e2 = wb.compute_erase("car", "truck", "", "uce", {"expand_prompts": False})
    wb.apply(e2)
    assert torch.allclose(model.weight(n), before + e1.deltas[n] + e2.deltas[n], atol=1e-5)
    assert torch.allclose(wb.applied.deltas[n], e1.deltas[n] + e2.deltas[n], atol=1e-6)
    wb.undo()
    assert torch.equal(model.weight(n), before) and wb.applied is None


def test_save_checkpoint_writes_base_plus_delta(bench):
    from weightsmith.core.model_io import load_model

    b, wb = bench
    model = b.model()
    edit = wb.compute_erase("cat", "dog", "", "erasepro", {"expand_prompts": False, "max_pad": 3})
    msg = wb.save_checkpoint(edit, "erased")
    out = b.checkpoint_dir() / "erased"  # a diffusers model saves as a folder
    assert out.is_dir() and str(out) in msg
    saved = load_model(out)
    for n, d in edit.deltas.items():
        assert torch.allclose(saved.weight(n), model.weight(n) + d, atol=1e-5), n


def test_refusals_are_clear(bench, tmp_path):
    from weightsmith.core.errors import WeightsmithError
    from weightsmith.core.lab.random_loras import random_lora
    from weightsmith.core.lab.random_models import build_random_model

    b, wb = bench
    t, _ = random_lora(build_random_model("sdxl", "tiny", seed=1), groups=("attn",), rank=2, seed=1)
    save_file(t, str(b.lora_dir() / "xl.safetensors"))
    with pytest.raises(WeightsmithError) as e:
        wb.compute_merge(["xl.safetensors"], "", "a cat", "linear", {})
    assert "xl" in str(e.value)
    with pytest.raises(WeightsmithError, match="one weight per LoRA"):
        wb.compute_merge(["xl.safetensors"], "1, 2", "", "linear", {})
    with pytest.raises(WeightsmithError, match="Targets"):
        wb.compute_erase(" , ", "dog", "", "uce", {})
    e = wb.compute_erase("cat", "dog", "", "uce", {"expand_prompts": False})
    e.family = "sdxl"
    with pytest.raises(WeightsmithError, match="SDXL"):
        wb.apply(e)
    assert wb.applied is None


def test_iteris_runs_from_the_tab_announces_its_passes_then_the_time_left_and_fills_the_table(bench):
    """A real IterIS merge from the tab (the one host test that solves with IterIS): before the first
    pass the job says how many passes it will run; from the first tick on (one per text-encoder batch
    and per UNet step) each label ends with the estimated time left (none on the last); every edited
    module's ‖ΔW‖/‖W‖ shows in the tab's table."""
    import contextlib

    b, wb = bench
    _random_loras(b.model(), b.lora_dir())
    seen = []

    @contextlib.contextmanager
    def job(title):
        yield (lambda done, total, label="": seen.append((done, total, label))), (lambda: False)

    b.job = job
    edit, _ = wb.compute_merge(
        ["r0.safetensors", "r1.safetensors"],
        "",
        "a cat\na dog",
        "iteris",
        {"iterations": 2, "samples": 1, "steps": 1, "seed": 0},
    )
    assert edit.report["method"] == "iteris" and edit.deltas
    assert wb.last_rows and all(r[3] is not None and r[3] > 0 for r in wb.last_rows)
    passes = 2 * (1 + 2 + 1)  # 2 LoRAs × (iteration 0 + 2 + final objective)
    total = passes * (1 + 1)  # each: 1 prompt batch + 1 sample × 1 UNet step
    assert seen[0][:2] == (0, total) and f"{passes} passes" in seen[0][2]
    assert "time left shows after the first step" in seen[0][2]
    assert [s[0] for s in seen] == list(range(total + 1))
    mids = [s for s in seen[1:] if s[0] < total]
    assert mids and all(s[2].endswith(" left") and "≈" in s[2] for s in mids), mids
    assert seen[-1][0] == total and "left" not in seen[-1][2]


def test_steps_estimate_follows_step_costs():
    from weightsmith.core.progress import Steps, format_duration

    got = []
    s = Steps(3, lambda d, t, l: got.append(l), costs=[1, 2, 2])
    s._t0 -= 10.0  # the first step (cost 1) took 10 s
    s.step("a")
    assert got[0].startswith("a · ≈") and abs(s.eta_s() - 40.0) < 1.0  # 4 units left at 10 s each
    assert format_duration(40) == "40 s" and format_duration(200) == "3 min" and format_duration(3900) == "1 h 05 min"
    with pytest.raises(ValueError):
        Steps(2, costs=[1])
