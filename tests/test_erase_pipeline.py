"""ErasePro / zero-residual / UCE on tiny models of every family (docs/method.md, "Concept erasure")."""

import pytest
import torch

from weightsmith.core.erase import EraseOptions, erase
from weightsmith.core.erase.pipeline import build_prompts, validate_concepts
from weightsmith.core.erase.pipeline import gather as _gather
from weightsmith.core.erase.tokens import align

FAMILIES = ("sd1", "sd2", "sdxl")
# few feature columns: the system is feasible; ridge=0 asks for the exact pseudoinverse solve even
# where the default would fall back to a ridge because the features are ill-conditioned
FEASIBLE = EraseOptions(expand_prompts=False, max_pad=2, ridge=0)


def _aligned(model, targets, anchors, opts):
    t, a, _ = validate_concepts(targets, anchors, [])
    ps = build_prompts(t, a, [], opts, expand=bool(opts.expand_prompts))
    comp = next(iter(model.tokenizers))
    tok = model.tokenizers[comp]
    pairs = [
        align(x.tolist(), y.tolist(), tok.eos_token_id, tok.bos_token_id, opts.tokens, opts.max_pad)
        for x, y in zip(model.tokenize(ps.targets, comp), model.tokenize(ps.anchors, comp))
    ]
    return ps, [p.target_pos for p in pairs], [p.anchor_pos for p in pairs]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["zero-residual", "erasepro"])
def test_zero_residual_methods_hit_the_anchor_exactly(tiny_models, family, method):
    model = tiny_models[family]
    # two targets of equal token length: duplicate feature columns (same token at the same position)
    # then ask for the same anchor feature, so the system stays feasible
    edit = erase(model, ["van gogh", "golf ball"], ["art"], method=method, options=FEASIBLE)
    assert edit.report["stages"], "no stage reported"
    assert max(s["rho"] for s in edit.report["stages"]) <= 1e-4
    # independent check: the edited model's K/V of the target tokens equal the original K/V of the anchor
    ps, tpos, apos = _aligned(model, ["van gogh", "golf ball"], ["art"], FEASIBLE)
    edited = edit.apply(model)
    Xe = _gather(edited.encode(ps.targets).context, tpos)
    Y = _gather(model.encode(ps.anchors).context, apos)
    for block in model.unet_cross_attention_names():
        for sub in ("to_k", "to_v"):
            w_new, w_old = edited.module(f"{block}.{sub}").weight, model.module(f"{block}.{sub}").weight
            err = (w_new @ Xe - w_old @ Y).norm() / (w_old @ Y).norm()
            assert err < 1e-4, (block, sub, float(err))
    if method == "erasepro":
        comps = {s["stage"].split(".")[0] for s in edit.report["stages"]}
        assert comps == set(model.text_encoders) | {"unet"}


def test_infeasible_system_is_reported_not_hidden(tiny_models):
    # targets of different token lengths put the same first-layer feature (EOS token at one position)
    # against two different anchor features: no W satisfies both, and rho must say so
    edit = erase(tiny_models["sd1"], ["van gogh", "monet"], ["art"], method="erasepro", options=FEASIBLE)
    first = [s for s in edit.report["stages"] if s["stage"] == "text_encoder.layer0"]
    assert first and min(s["rho"] for s in first) > 1e-2
    assert all(s["rank"] < s["features"] for s in first)


@pytest.mark.parametrize("family", FAMILIES)
def test_uce_residual_is_not_zero_and_matches_closed_form(tiny_models, family):
    model = tiny_models[family]
    opts = FEASIBLE
    edit = erase(model, ["van gogh"], ["art"], method="uce", options=opts)
    ps, tpos, apos = _aligned(model, ["van gogh"], ["art"], opts)
    X = _gather(model.encode(ps.targets).context, tpos).double()
    Y = _gather(model.encode(ps.anchors).context, apos).double()
    name = model.unet_cross_attention_names()[0] + ".to_v"
    W = model.weight(name).double()
    d = X.shape[0]
    lam = opts.lam
    W_new = (lam * W + W @ Y @ X.T) @ torch.linalg.inv(lam * torch.eye(d, dtype=torch.float64) + X @ X.T)
    assert torch.allclose(W + edit.deltas[name].double(), W_new, atol=1e-4, rtol=1e-4)
    rhos = [s["rho"] for s in edit.report["stages"]]
    assert min(rhos) > 1e-3


def test_preserve_concepts_reduce_collateral_change(tiny_models):
    model = tiny_models["sd1"]
    probe = ["painting by picasso", "a photo of a horse", "picasso"]
    cond = model.encode(probe).context
    names = [n + ".to_k" for n in model.unet_cross_attention_names()]

    def change(edit):
        return sum(float((edit.deltas[n] @ cond.reshape(-1, cond.shape[-1]).T).norm()) for n in names)

    plain = erase(model, ["van gogh"], ["art"], method="zero-residual", options=FEASIBLE)
    kept = erase(model, ["van gogh"], ["art"], ["picasso", "horse"], method="zero-residual", options=FEASIBLE)
    assert change(kept) < 0.8 * change(plain)
    assert max(s["rho"] for s in kept.report["stages"]) <= 1e-4  # still exact on the edit features


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_report_and_erasepro_unet_stage_is_smaller(tiny_models, family):
    model = tiny_models[family]
    opts = EraseOptions(expand_prompts=False, max_pad=2, ridge=0)
    ep = erase(model, ["van gogh"], ["art"], method="erasepro", options=opts)
    zr = erase(model, ["van gogh"], ["art"], method="zero-residual", options=opts)
    for s in ep.report["stages"]:
        W = model.weight(s["layer"]) if s["layer"].startswith("unet") else model.module(s["layer"]).weight
        assert s["delta_rel"] == pytest.approx(float(ep.deltas[s["layer"]].norm() / W.norm()), rel=1e-4)
        assert {"layer", "delta_fro", "delta_rel", "residual_before", "residual_after"} <= set(s)
    unet = lambda e: sum(float(e.deltas[s["layer"]].norm()) for s in e.report["stages"] if s["stage"] == "unet")  # noqa: E731
    assert unet(ep) < unet(zr)
    # the text-encoder stages moved the target features towards the anchor before the UNet stage
    ep_unet = [s for s in ep.report["stages"] if s["stage"] == "unet"]
    assert all(s["residual_before"] < 1.0 for s in ep_unet)
    assert ep.report["summary"][-1]["stage"] == "unet"


def test_input_model_is_not_modified(tiny_models):
    model = tiny_models["sd2"]
    name = model.unet_cross_attention_names()[0] + ".to_k"
    te_w = model.text_encoders["text_encoder"].state_dict()
    before = model.weight(name).clone()
    erase(model, ["van gogh"], ["art"], method="erasepro", options=FEASIBLE)
    assert torch.equal(model.weight(name), before)
    for k, v in model.text_encoders["text_encoder"].state_dict().items():
        assert torch.equal(v, te_w[k])


def test_progress_and_cancel(tiny_models):
    from weightsmith.core.errors import CancelledError

    seen = []
    erase(tiny_models["sd1"], ["cat"], ["dog"], options=FEASIBLE, progress=lambda d, t, l: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == sorted(d for d, _ in seen)
    calls = []
    with pytest.raises(CancelledError):
        erase(tiny_models["sd1"], ["cat"], ["dog"], options=FEASIBLE, cancel=lambda: len(calls.append(1) or calls) > 3)


def test_our_uce_equals_the_public_script_algorithm(tiny_models):
    """Single-token concepts, where the script's token rule and ours select the same rows."""
    import copy

    from weightsmith.core.lab.reference import reference_uce

    model = copy.copy(tiny_models["sd1"])
    # the script works in float32 with torch.inverse; run it in float64 so only the algorithm is compared
    model.text_encoders = {c: copy.deepcopy(t).double() for c, t in model.text_encoders.items()}
    unet = copy.deepcopy(model.unet).double()
    model._unet, model.unet_loader = unet, (lambda: unet)
    targets, preserve = ["monet", "picasso"], ["dog"]
    ref = reference_uce(model, targets, ["art", "art"], preserve)
    ours = erase(
        model,
        targets,
        ["art"],
        preserve,
        method="uce",
        options=EraseOptions(expand_prompts=False, preserve_captions=False),
    )
    for name, w in ref.items():
        d_ref = w - model.weight(name)
        assert torch.allclose(ours.deltas[name].double(), d_ref, atol=1e-5 * float(d_ref.abs().max())), name


def test_sdxl_text_encoder_stages_move_the_pooled_output(tiny_models):
    model = tiny_models["sdxl"]
    target, anchor = ["van gogh"], ["art"]
    base_t, base_a = model.encode(target).pooled, model.encode(anchor).pooled
    ep = erase(model, target, anchor, method="erasepro", options=FEASIBLE)
    uce = erase(model, target, anchor, method="uce", options=FEASIBLE)
    after = ep.apply(model).encode(target).pooled
    assert torch.equal(uce.apply(model).encode(target).pooled, base_t)  # UCE edits only the UNet
    assert (after - base_a).norm() < 0.9 * (base_t - base_a).norm()
    assert any(k.startswith("text_encoder_2.") for k in ep.deltas)


def test_clip_skip_limits_the_edited_text_encoder_layers(tiny_checkpoints, tokenizer_dir):
    from weightsmith.core.model_io import load_model

    m1 = load_model(tiny_checkpoints["sd1"], tokenizer=tokenizer_dir)
    m2 = load_model(tiny_checkpoints["sd1"], tokenizer=tokenizer_dir, clip_skip=2)
    assert m1.encoder_specs["text_encoder"].layer == -1 and m2.encoder_specs["text_encoder"].layer == -2
    out = m2.text_encoders["text_encoder"](input_ids=m2.tokenize(["a cat"]), output_hidden_states=True)
    te = m2.text_encoders["text_encoder"]
    ln = getattr(te, "text_model", te).final_layer_norm  # transformers 4.x nests it, 5.x does not
    assert torch.allclose(m2.encode(["a cat"]).context, ln(out.hidden_states[-2]), atol=1e-6)
    e = erase(m2, ["cat"], ["dog"], method="erasepro", options=FEASIBLE)
    layers = {s["stage"] for s in e.report["stages"] if s["stage"] != "unet"}
    n = m2.text_encoders["text_encoder"].config.num_hidden_layers
    assert layers == {f"text_encoder.layer{i}" for i in range(n - 1)}
    assert max(s["rho"] for s in e.report["stages"]) <= 1e-4


def test_default_solver_is_exact_when_well_conditioned_and_falls_back_to_ridge_otherwise(tiny_models):
    model = tiny_models["sd1"]
    # one short target, few rows: well-conditioned, solved exactly by default
    e = erase(
        model, ["van gogh"], ["art"], method="zero-residual", options=EraseOptions(expand_prompts=False, max_pad=2)
    )
    assert {s["solver"] for s in e.report["stages"]} == {"exact"}
    assert max(s["rho"] for s in e.report["stages"]) <= 1e-4
    # many templates: more rows than dimensions, near-collinear padding -> ridge fallback, reported
    opts = EraseOptions(expand_prompts=True)
    auto = erase(model, ["van gogh"], ["art"], method="zero-residual", options=opts)
    exact = erase(
        model, ["van gogh"], ["art"], method="zero-residual", options=EraseOptions(expand_prompts=True, ridge=0)
    )
    assert {s["solver"] for s in auto.report["stages"]} == {"ridge"}
    assert all(0 < s["rho"] < 1 for s in auto.report["stages"])
    norm = lambda e: sum(float(d.norm()) for d in e.deltas.values())  # noqa: E731
    assert norm(auto) < 0.5 * norm(exact)


def test_erase_bench_reports_the_floor_and_where_time_went(capsys):
    """``bench erase --size tiny``: the floor is the sum of its parts, every method has its ratio to
    it, and erasepro's timing split adds up to no more than its total time."""
    import json

    from weightsmith.core.cli import main

    assert main(["bench", "erase", "--size", "tiny", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    f = res["erasepro_floor"]
    assert abs(f["time_s"] - (f["encode_all_s"] + f["encode_targets_s"] + f["solve_s"])) < 1e-9
    assert f["prompts"] > f["targets"] > 0
    for name, r in res["methods"].items():
        assert abs(r["floor_ratio"] - r["time_s"] / f["time_s"]) < 1e-9, name
    t = res["methods"]["erasepro"]["timing_s"]
    assert min(t.values()) >= 0 and sum(t.values()) <= res["methods"]["erasepro"]["time_s"] + 1e-6
    assert set(res["methods"]) == {"reference-uce", "uce", "uce, same prompts", "zero-residual", "erasepro"}
