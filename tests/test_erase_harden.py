"""Hardening rounds (docs/method.md, "Hardening rounds"): the closed-form adversarial input against an
independent solve, a round's edit against erasing the same inputs by hand, rounds = 0 against the plain
solve, and every method's adversarial residual falling with rounds on tiny random models."""

import pytest
import torch

from weightsmith.core.erase import EraseOptions, erase
from weightsmith.core.erase.harden import StageGrams, adversarial_inputs, measure, ridge_lambda
from weightsmith.core.erase.pipeline import build_prompts, validate_concepts
from weightsmith.core.erase.pipeline import gather as _gather
from weightsmith.core.erase.solvers import UCEBasis, ZeroResidualBasis
from weightsmith.core.erase.tokens import align
from weightsmith.core.errors import WeightsmithError
from weightsmith.core.report import hardening_lines, picture, relative_changes, rows, text

F64 = torch.float64
METHODS = ("uce", "zero-residual", "erasepro")


def _stage(seed=0, d_in=12, outs=(7, 9, 5), n=3):
    g = torch.Generator().manual_seed(seed)
    Wo = [torch.randn(o, d_in, generator=g, dtype=F64) for o in outs]
    We = [w + 0.3 * torch.randn(w.shape, generator=g, dtype=F64) for w in Wo]
    Xt = torch.randn(d_in, n, generator=g, dtype=F64)
    return We, Wo, Xt


@pytest.mark.parametrize("reg", [1e-3, 1e-2, 0.5])
def test_adversarial_inputs_equal_the_stacked_least_squares_solve(reg):
    We, Wo, Xt = _stage()
    got = adversarial_inputs(We, Wo, Xt, reg)
    assert got.dtype == F64 and got.shape == Xt.shape
    # λ from its definition (reg × mean squared Frobenius norm per input dimension), then the stacked
    # system [W_e1; W_e2; ...; √λ I] X = [W_o1 X_t; ...; 0] solved by least squares
    d = Xt.shape[0]
    lam = reg * sum(float((w**2).sum()) for w in We) / d
    A = torch.cat([*We, lam**0.5 * torch.eye(d, dtype=F64)], 0)
    B = torch.cat([*(w @ Xt for w in Wo), torch.zeros(d, Xt.shape[1], dtype=F64)], 0)
    want = torch.linalg.lstsq(A, B).solution
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # and the objective's gradient vanishes there
    X = got.clone().requires_grad_(True)
    f = sum(((a @ X - b @ Xt) ** 2).sum() for a, b in zip(We, Wo)) + lam * (X**2).sum()
    (grad,) = torch.autograd.grad(f, X)
    assert float(grad.norm()) < 1e-9 * float(Xt.norm()) * sum(float(w.norm()) ** 2 for w in We)


def test_unedited_weights_give_back_the_target_without_regulariser_shrinkage():
    _, Wo, Xt = _stage(1)
    x = adversarial_inputs(Wo, Wo, Xt, 1e-12)
    torch.testing.assert_close(x, Xt, rtol=1e-8, atol=1e-8)


def test_measure_matches_a_direct_computation():
    We, Wo, Xt = _stage(2)
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(Xt.shape, generator=g, dtype=F64)
    P = torch.randn(Xt.shape[0], 6, generator=g, dtype=F64)
    reg = 0.02
    grams = StageGrams.of(We, Wo)
    row, X_adv = measure(grams, Xt, Y, reg, P)
    torch.testing.assert_close(X_adv, adversarial_inputs(We, Wo, Xt, reg))
    X0 = adversarial_inputs(Wo, Wo, Xt, reg)
    gap = sum(float(((w @ (Y - Xt)) ** 2).sum()) for w in Wo) ** 0.5
    d_e = sum(float(((a @ X_adv - b @ Xt) ** 2).sum()) for a, b in zip(We, Wo)) ** 0.5
    d_0 = sum(float(((b @ X0 - b @ Xt) ** 2).sum()) for b in Wo) ** 0.5
    assert row["adv_distance"] == pytest.approx(d_e / gap, rel=1e-9)
    assert row["adv_distance_unedited"] == pytest.approx(d_0 / gap, rel=1e-6, abs=1e-9)
    assert row["adv_residual"] == pytest.approx((1 - d_e / gap) / (1 - d_0 / gap), rel=1e-9)
    dn = sum(float(((a - b) ** 2).sum()) for a, b in zip(We, Wo)) ** 0.5
    wn = sum(float((b**2).sum()) for b in Wo) ** 0.5
    assert row["delta_rel"] == pytest.approx(dn / wn, rel=1e-9)
    pr = sum(float((((a - b) @ P) ** 2).sum()) for a, b in zip(We, Wo)) ** 0.5
    pn = sum(float(((b @ P) ** 2).sum()) for b in Wo) ** 0.5
    assert row["preserve_residual"] == pytest.approx(pr / pn, rel=1e-9)
    assert row["adv_input_norm"] == pytest.approx(float(X_adv.norm() / Xt.norm()))
    assert row["lam"] == pytest.approx(ridge_lambda(grams.A, reg))


def test_grams_from_low_rank_factors_equal_the_direct_sums():
    g = torch.Generator().manual_seed(4)
    Wo = [torch.randn(o, 10, generator=g, dtype=F64) for o in (6, 14)]
    fac = [(torch.randn(w.shape[0], 3, generator=g, dtype=F64), torch.randn(3, 10, generator=g, dtype=F64)) for w in Wo]
    direct, low = StageGrams(10), StageGrams(10)
    for w, (u, d) in zip(Wo, fac):
        direct.add(w, u @ d)
        low.add(w, u @ d, (u, d))
    We = [w + u @ d for w, (u, d) in zip(Wo, fac)]
    for k in ("A", "B", "C", "DtD"):
        torch.testing.assert_close(getattr(direct, k), getattr(low, k), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(low.A, sum(w.T @ w for w in We))
    torch.testing.assert_close(low.B, sum(a.T @ b for a, b in zip(We, Wo)))
    # a later round reuses C: the same sums
    again = StageGrams(10, low.C)
    for w, (u, d) in zip(Wo, fac):
        again.add(w, u @ d, (u, d))
    torch.testing.assert_close(again.A, low.A, rtol=1e-12, atol=1e-10)


def test_adversarial_inputs_refuse_mismatched_lists():
    We, Wo, Xt = _stage()
    with pytest.raises(ValueError):
        adversarial_inputs(We[:2], Wo, Xt)
    with pytest.raises(ValueError):
        adversarial_inputs([We[0], We[1].T @ We[1][:, :7]], Wo[:2], Xt)


# -- the pipeline ------------------------------------------------------------------------------------
OPTS = dict(expand_prompts=False, max_pad=2)


def _features(model, targets, anchors, opts):
    t, a, _ = validate_concepts(targets, anchors, [])
    ps = build_prompts(t, a, [], opts, expand=False)
    comp = next(iter(model.tokenizers))
    tok = model.tokenizers[comp]
    pairs = [
        align(x.tolist(), y.tolist(), tok.eos_token_id, tok.bos_token_id, opts.tokens, opts.max_pad)
        for x, y in zip(model.tokenize(ps.targets, comp), model.tokenize(ps.anchors, comp))
    ]
    X = _gather(model.encode(ps.targets).context, [p.target_pos for p in pairs]).to(F64)
    Y = _gather(model.encode(ps.anchors).context, [p.anchor_pos for p in pairs]).to(F64)
    return X, Y


def _unet_names(model, opts):
    return [f"{b}.{s}" for b in model.unet_cross_attention_names() for s in opts.unet_sublayers]


@pytest.mark.parametrize("method", ["zero-residual", "uce"])
def test_a_round_equals_erasing_the_adversarial_inputs_by_hand(tiny_models, one_thread, method):
    model = tiny_models["sd1"]
    opts0 = EraseOptions(**OPTS)
    opts2 = EraseOptions(**OPTS, harden_rounds=2)
    targets, anchors = ["van gogh"], ["art"]
    X, Y = _features(model, targets, anchors, opts0)
    names = _unet_names(model, opts0)
    Wo = [model.weight(n).to(F64) for n in names]

    def solve(Xa, Ya):
        if method == "uce":
            b = UCEBasis(Xa, Ya, None, opts0.lam, opts0.eta_erase, opts0.eta_preserve)
            return [b.delta(w)[0] for w in Wo]
        b = ZeroResidualBasis(Xa, None, opts0.rcond, opts0.ridge, opts0.cond_limit)
        return [b.delta(w @ (Ya - Xa))[0] for w in Wo]

    # rounds = 0 is the plain solve, and the regulariser does not touch it
    plain = erase(model, targets, anchors, method=method, options=opts0)
    other_reg = erase(model, targets, anchors, method=method, options=EraseOptions(**OPTS, harden_reg=0.5))
    by_hand = solve(X, Y)
    for n, d in zip(names, by_hand):
        torch.testing.assert_close(plain.deltas[n].to(F64), d, rtol=1e-5, atol=1e-7)
        assert torch.equal(plain.deltas[n], other_reg.deltas[n])
    # two rounds by hand: derive X* on the edit so far, append it paired with the anchor, solve again
    Xa, Ya, deltas = X, Y, by_hand
    for _ in range(2):
        Xs = adversarial_inputs([w + d for w, d in zip(Wo, deltas)], Wo, X, opts2.harden_reg)
        Xa, Ya = torch.cat([Xa, Xs], 1), torch.cat([Ya, Y], 1)
        deltas = solve(Xa, Ya)
    hardened = erase(model, targets, anchors, method=method, options=opts2)
    for n, d in zip(names, deltas):
        torch.testing.assert_close(hardened.deltas[n].to(F64), d, rtol=1e-4, atol=1e-6)
    rows_ = [r for r in hardened.report["hardening"] if r["stage"] == "unet"]
    assert [r["round"] for r in rows_] == [0, 1, 2]
    # the last row measures the final edit: its ‖Δ‖/‖W‖ is the hand-made one's
    dn = sum(float((d**2).sum()) for d in deltas) ** 0.5 / sum(float((w**2).sum()) for w in Wo) ** 0.5
    assert rows_[-1]["delta_rel"] == pytest.approx(dn, rel=1e-4)


@pytest.mark.parametrize("family,method", [(f, m) for f in ("sd1", "sdxl") for m in METHODS])
def test_rounds_lower_the_adversarial_residual(tiny_models, one_thread, family, method):
    model = tiny_models[family]

    def unet_rows(rounds):
        e = erase(model, ["van gogh"], ["art"], ["monet"], method=method, options=EraseOptions(harden_rounds=rounds))
        rs = [r for r in e.report["hardening"] if r["stage"] == "unet"]
        assert [r["round"] for r in rs] == list(range(rounds + 1))
        assert e.report["hardening_summary"][-1]["adv_residual_unet"] == rs[-1]["adv_residual"]
        return e, rs

    e0, r0 = unet_rows(0)
    assert {r["stage"] for r in e0.report["hardening"]} == {"unet"}  # without rounds: the UNet row alone
    e2, r2 = unet_rows(2)
    plain = r0[0]["adv_residual"]
    assert 0 < plain <= 1.05  # the plain edit leaves most of the closed-form reach (the known weakness)
    assert r2[-1]["adv_residual"] < plain - 0.05
    assert r2[-1]["adv_residual"] < r2[1]["adv_residual"] < r2[0]["adv_residual"]
    # the derived inputs stay the size of real conditioning features
    assert all(0.5 < r["adv_input_norm"] < 2 for r in r2)
    # preserve residual reported, and the edit still keeps the preserve concept's outputs close
    assert all(r["preserve_residual"] is not None and r["preserve_residual"] < 0.2 for r in r2)
    if method == "erasepro":
        te = {r["stage"] for r in e2.report["hardening"]} - {"unet"}
        assert te and all(s.split(".")[0] in model.text_encoders for s in te)


def test_report_text_and_picture_show_the_hardening_rows(tiny_models, one_thread):
    model = tiny_models["sd1"]
    e = erase(model, ["van gogh"], ["art"], method="uce", options=EraseOptions(harden_rounds=2))
    lines = hardening_lines(e.report)
    assert len(lines) == 1 + 3 and "adversarial residual" in lines[0]
    want = e.report["hardening_summary"][2]["adv_residual_unet"]
    assert f"{want:.3f}" in lines[-1]
    rs = rows(e, relative_changes(e, model))
    t = text(e, rs, "t")
    assert all(line in t for line in lines)
    plain = picture(rs, "t", "f")
    with_rows = picture(rs, "t", "f", hardening=lines)
    assert with_rows.height > plain.height
    assert hardening_lines({}) == []


@pytest.mark.parametrize("bad", [-1, 11, 1.5, True])
def test_rounds_out_of_range_are_refused(tiny_models, bad):
    with pytest.raises(WeightsmithError, match="harden_rounds"):
        erase(tiny_models["sd1"], ["van gogh"], ["art"], options=EraseOptions(harden_rounds=bad))


def test_the_three_front_ends_pass_the_rounds_through(
    tmp_path, monkeypatch, capsys, one_thread, tiny_models, solver_recorder
):
    import json
    import sys
    import types

    model = tiny_models["sd1"]
    # CLI
    import weightsmith.core.model_io as model_io
    from weightsmith.core.cli import main

    (tmp_path / "model").mkdir()
    monkeypatch.setattr(model_io, "load_model", lambda *a, **k: model)
    argv = ["erase", "--model", str(tmp_path / "model"), "--target", "cat", "--method", "uce", "--format", "diff"]
    rep = tmp_path / "r.json"
    out = str(tmp_path / "o.safetensors")
    assert main([*argv, "--out", out, "--report", str(rep), "--harden-rounds", "2"]) == 0
    report = json.loads(rep.read_text())  # the CLI runs core.erase.pipeline.erase itself, not the recorder
    assert report["options"]["harden_rounds"] == 2
    assert [r["round"] for r in report["hardening"]] == [0, 1, 2]
    assert "round 2: adversarial residual" in capsys.readouterr().out
    # ComfyUI: the node's input is the declared one, and its value reaches the solver
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

    kind, decl = WeightsmithEraseConcepts.INPUT_TYPES()["optional"]["harden_rounds"]
    assert (kind, decl["default"], decl["min"], decl["max"]) == ("INT", 0, 0, 10)
    monkeypatch.setattr(ca, "sdmodel_from_comfy", lambda m, c, **k: model)
    monkeypatch.setattr(ca, "apply_edit", lambda m, c, edit, s: (m, c))
    WeightsmithEraseConcepts().run("MODEL", "CLIP", "cat", "art", "uce", 1.0, harden_rounds=3)
    assert solver_recorder.calls[-1]["options"].harden_rounds == 3
    # A1111/Forge: the tab's slider value (gradio gives floats) through the workbench
    from weightsmith.a1111_extension.backend import StandaloneBackend, Workbench
    from weightsmith.a1111_extension.ui import _rounds

    assert (_rounds(2.0), _rounds(""), _rounds(None), _rounds(1.5)) == (2, None, None, 1.5)
    b = StandaloneBackend(tmp_path / "unused", tmp_path / "loras", tmp_path / "ckpts")
    b._model = model
    Workbench(b).compute_erase("cat", "art", "", "uce", {"harden_rounds": _rounds(4.0)})
    assert solver_recorder.calls[-1]["options"].harden_rounds == 4
    with pytest.raises(WeightsmithError, match="harden_rounds"):
        Workbench(b).compute_erase("cat", "art", "", "uce", {"harden_rounds": _rounds(1.5)})


def test_rounds_are_cancellable_between_solves(tiny_models, one_thread):
    from weightsmith.core.errors import CancelledError

    model = tiny_models["sd1"]

    def asked(rounds, stop_at=None):
        n = [0]

        def cancel():
            n[0] += 1
            return stop_at is not None and n[0] >= stop_at

        erase(model, ["van gogh"], ["art"], method="uce", options=EraseOptions(harden_rounds=rounds), cancel=cancel)
        return n[0]

    plain, hardened = asked(0), asked(3)
    assert hardened == plain + 3  # one check before each round's solve
    with pytest.raises(CancelledError):
        asked(3, stop_at=2)  # the start's check passes, the first round's stops it
