"""``weightsmith bench erase``: our erasure methods beside the public UCE script's algorithm.

On an SD1.5-architecture model with random weights at full size (UNet 320 channels, CLIP-L
12×768; built in-process, seeded), the same targets are erased by

- ``reference-uce``: a faithful re-implementation of the public UCE script's ``edit_model``
  (``rohitgandikota/unified-concept-editing``, older token rule): for every projection matrix
  in turn it re-encodes every target/guide pair, projects the features through every matrix,
  accumulates ``mat1 = λW + Σ v kᵀ`` and ``mat2 = λI + Σ k kᵀ`` and sets ``W = mat1 · mat2⁻¹``
  (float32, ``torch.inverse``), ``technique="replace"`` so that ``v* = W_o c*`` as in docs/method.md, "UCE";
- our ``uce``, ``zero-residual`` and ``erasepro``.

Printed: time and peak memory of each, as ratios to the reference, and the K/V residual ratio
ρ = ‖W'X − W_oY‖/‖W_o(Y − X)‖ on held-out prompts that put the targets in context (not used
for the edit), averaged over all UNet cross-attention k/v matrices.
"""
from __future__ import annotations

import json

TARGETS = ["van gogh", "monet"]
ANCHOR = "art"
PRESERVE = ["picasso"]
HELD_OUT = ["a cafe at night by {}, oil on canvas", "a river landscape in the style of {} with a bridge",
            "an old church painted by {} under a starry sky", "a portrait of a young woman by {} in a garden"]


def add_arguments(p) -> None:
    p.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="full: SD1.5 architecture (default); tiny: a quick smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="time each method this many times (best is kept)")
    p.add_argument("--sweep", action="store_true",
                   help="instead of timing: sweep the zero-residual solver's knobs (ridge, cond_limit fallback, "
                        "max_pad, exact_subspace, merge_tol) and print ρ on the edit and held-out prompts, drift "
                        "on held-out preserve prompts and ‖Δ‖/‖W‖ per stage (see core/erase/sweep.py)")
    p.add_argument("--family", choices=("sd1", "sdxl", "world"), default="sd1",
                   help="--sweep only: sd1 (SD1.5 architecture) or sdxl (the reduced SDXL architecture: "
                        "see core/random_models.py, size 'reduced'), both random; world: the embedded trained "
                        "world and its circle -> square erasure")
    p.add_argument("--samples", type=int, default=0,
                   help="--sweep --family world only: also judge-read erasure and preservation on held-out prompts, "
                        "this many images per prompt set and setting (0: residuals only)")
    p.add_argument("--quick", action="store_true", help="--sweep only: tiny model and three settings (smoke run)")
    p.add_argument("--concepts", type=int, default=0, metavar="N",
                   help="instead: erase N concepts at once (and N/2) with uce and erasepro; time and peak RSS "
                        "(see core/bench_concepts.py)")


def reference_uce(model, old_texts, new_texts, retain_texts, lamb=0.5, erase_scale=1.0, preserve_scale=1.0):
    """The public script's algorithm (per-matrix loop, re-encoding inside it); returns new weights."""
    import torch

    tok = model.tokenizers["text_encoder"]
    te = model.text_encoders["text_encoder"]
    blocks = model.unet_cross_attention_names()
    mats = [model.module(b + ".to_v") for b in blocks] + [model.module(b + ".to_k") for b in blocks]
    weights = [m.weight.detach().clone() for m in mats]      # edited copies (the model stays intact)

    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        out = te(ids.input_ids)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state, ids.attention_mask

    for layer_num in range(len(mats)):
        with torch.no_grad():
            W = weights[layer_num]
            mat1 = lamb * W
            mat2 = lamb * torch.eye(W.shape[1], dtype=W.dtype)
            for old_text, new_text in zip(old_texts, new_texts):
                emb, mask = encode([old_text, new_text])
                fi = int(mask[0].sum()) - 2
                fin = int(mask[1].sum()) - 2
                far = max(fi, fin)
                old_emb = emb[0][fi:len(emb[0]) - max(0, far - fi)]
                new_emb = emb[1][fin:len(emb[1]) - max(0, far - fin)]
                context = old_emb.detach()
                values = [torch.nn.functional.linear(new_emb, w0).detach() for w0 in
                          (m.weight for m in mats)]        # technique="replace" with the original W
                ctx_v = context.reshape(context.shape[0], context.shape[1], 1)
                ctx_t = context.reshape(context.shape[0], 1, context.shape[1])
                val = values[layer_num].reshape(values[layer_num].shape[0], values[layer_num].shape[1], 1)
                mat1 = mat1 + erase_scale * (val @ ctx_t).sum(dim=0)
                mat2 = mat2 + erase_scale * (ctx_v @ ctx_t).sum(dim=0)
            for text in retain_texts:
                emb, _ = encode([text, text])
                context = emb[0].detach()
                values = [torch.nn.functional.linear(emb[1], m.weight).detach() for m in mats]
                ctx_v = context.reshape(context.shape[0], context.shape[1], 1)
                ctx_t = context.reshape(context.shape[0], 1, context.shape[1])
                val = values[layer_num].reshape(values[layer_num].shape[0], values[layer_num].shape[1], 1)
                mat1 = mat1 + preserve_scale * (val @ ctx_t).sum(dim=0)
                mat2 = mat2 + preserve_scale * (ctx_v @ ctx_t).sum(dim=0)
            weights[layer_num] = mat1 @ torch.inverse(mat2)
    names = [b + ".to_v" for b in blocks] + [b + ".to_k" for b in blocks]
    return dict(zip(names, weights))


def heldout_rho(model, edited_encoder_model, deltas) -> float:
    """Mean K/V residual ratio on held-out in-context prompts (UNet cross-attention)."""
    from .pipeline import _gather
    from .tokens import align

    tok = model.tokenizers["text_encoder"]
    tgt = [t.format(c) for c in TARGETS for t in HELD_OUT]
    anc = [t.format(ANCHOR) for _ in TARGETS for t in HELD_OUT]
    pairs = [align(a.tolist(), b.tolist(), tok.eos_token_id, tok.bos_token_id)
             for a, b in zip(model.tokenize(tgt), model.tokenize(anc))]
    X = _gather(edited_encoder_model.encode(tgt).context, [p.target_pos for p in pairs]).double()
    X0 = _gather(model.encode(tgt).context, [p.target_pos for p in pairs]).double()
    Y = _gather(model.encode(anc).context, [p.anchor_pos for p in pairs]).double()
    rhos = []
    for name, d in deltas.items():
        if not name.startswith("unet."):
            continue
        W = model.weight(name).double()
        rhos.append(float(((W + d.double()) @ X - W @ Y).norm() / (W @ (Y - X0)).norm()))
    return sum(rhos) / len(rhos) if rhos else float("nan")


def run(args) -> int:
    if getattr(args, "concepts", 0):
        from ..bench_concepts import run_concepts

        return run_concepts(args)
    if getattr(args, "sweep", False):
        from .sweep import run_sweep

        return run_sweep(args)
    import torch

    from ..memory import PeakRSS
    from ..random_models import build_random_model
    from . import EraseOptions, erase

    torch.manual_seed(args.seed)
    model = build_random_model("sd1", args.size, seed=args.seed)
    _ = model.unet
    rows = {}

    def timed(fn):
        best = None
        for _ in range(max(1, args.repeats)):
            with PeakRSS() as m:
                out = fn()
            if best is None or m.seconds < best[1].seconds:
                best = (out, m)
        return best

    ref_w, m = timed(lambda: reference_uce(model, TARGETS, [ANCHOR] * len(TARGETS), PRESERVE))
    ref_deltas = {n: w - model.weight(n) for n, w in ref_w.items()}
    rows["reference-uce"] = {"time_s": m.seconds, "peak_mib": m.mib,
                             "heldout_rho": heldout_rho(model, model, ref_deltas)}
    uce_opts = EraseOptions(expand_prompts=False, preserve_captions=False)
    same = EraseOptions(expand_prompts=True)     # uce on erasepro's prompt set (templates + captions)
    for label, method, opts in (("uce", "uce", uce_opts), ("uce, same prompts", "uce", same),
                                ("zero-residual", "zero-residual", EraseOptions()),
                                ("erasepro", "erasepro", EraseOptions())):
        edit, m = timed(lambda: erase(model, TARGETS, [ANCHOR], PRESERVE, method, opts))
        enc = _encoders_only(model, edit) if method == "erasepro" else model
        rows[label] = {"time_s": m.seconds, "peak_mib": m.mib, "heldout_rho": heldout_rho(model, enc, edit.deltas),
                        "unet_delta_rel": _mean([s["delta_rel"] for s in edit.report["stages"] if s["stage"] == "unet"]),
                        "edit_rho_max": max(s["rho"] for s in edit.report["stages"])}
        if label == "uce":
            rows[label]["max_abs_diff_vs_reference"] = max(
                float((edit.deltas[n] - ref_deltas[n]).abs().max()) for n in ref_deltas)
        rows[label]["timing_s"] = edit.report.get("timing_s")
    floor = erasepro_floor(model, rows["erasepro"]["timing_s"]["solve"], args.repeats)
    ref = rows["reference-uce"]
    for r in rows.values():
        r["time_ratio"] = r["time_s"] / ref["time_s"]
        r["floor_ratio"] = r["time_s"] / floor["time_s"]
        r["mem_ratio"] = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else float("nan")
    result = {"model": f"sd1 random, size={args.size}, seed={args.seed}", "targets": TARGETS, "anchor": ANCHOR,
              "preserve": PRESERVE, "held_out_templates": HELD_OUT, "methods": rows, "erasepro_floor": floor,
              "goals": {"erasepro_floor_ratio_max": 1.3, "erasepro_vs_our_uce_max": 3.0, "uce_time_ratio_max": 1.0}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"erasure benchmark on {result['model']} ({torch.get_num_threads()} threads)")
        print(f"erasepro floor: {floor['time_s']:.2f} s = original encoder once over all "
              f"{floor['prompts']} prompts ({floor['encode_all_s']:.2f} s) + encoder once over the "
              f"{floor['targets']} targets ({floor['encode_targets_s']:.2f} s) + erasepro's solves "
              f"({floor['solve_s']:.2f} s)")
        print(f"{'method':<19}{'time s':>9}{'× ref':>8}{'× floor':>9}{'peak MiB':>10}{'× ref':>8}{'held-out ρ':>12}")
        for k, r in rows.items():
            print(f"{k:<19}{r['time_s']:>9.2f}{r['time_ratio']:>8.2f}{r['floor_ratio']:>9.2f}{r['peak_mib']:>10.0f}"
                  f"{r['mem_ratio']:>8.2f}{r['heldout_rho']:>12.4f}")
        t = rows["erasepro"]["timing_s"]
        print(f"erasepro time: encoder passes {t['encode']:.2f} s, report rows {t['report']:.2f} s, "
              f"solves and the rest {t['solve']:.2f} s")
        print(f"our uce vs reference: max |ΔW difference| = {rows['uce']['max_abs_diff_vs_reference']:.2e} "
              "(the script inverts in float32 and starts multi-token concepts at their last token; on "
              "single-token concepts in float64 the two agree to 1e-5, see tests)")
        print(f"goals: erasepro ≤ 1.3× its floor (got {rows['erasepro']['floor_ratio']:.2f}×), ≤ 3× our uce "
              f"on the same prompts (got {rows['erasepro']['time_s'] / rows['uce, same prompts']['time_s']:.2f}×), uce ≤ 1.0× reference "
              f"(got {rows['uce']['time_ratio']:.2f}×)")
    return 0


def erasepro_floor(model, solve_s: float, repeats: int = 1) -> dict:
    """The necessary work of erasepro on the bench's concepts, timed here: the original encoder once
    over every prompt erasepro builds (targets, anchors, preserve), the encoder once more over the
    targets (the edited encoder costs the same), plus erasepro's own solve time."""
    import time

    from .options import EraseOptions
    from .pipeline import build_prompts, validate_concepts

    ps = build_prompts(*validate_concepts(TARGETS, [ANCHOR], PRESERVE), EraseOptions(), True)
    every = ps.targets + ps.anchors + ps.preserve

    def best(prompts):
        t = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            model.encode(prompts)
            t.append(time.perf_counter() - t0)
        return min(t)

    enc_all, enc_t = best(every), best(ps.targets)
    return {"time_s": enc_all + enc_t + solve_s, "encode_all_s": enc_all, "encode_targets_s": enc_t,
            "solve_s": solve_s, "prompts": len(every), "targets": len(ps.targets)}


def _encoders_only(model, edit):
    """The model with only the text-encoder part of an edit applied (the UNet is read via deltas)."""
    import copy

    from ..edit import Edit

    te_only = {k: v for k, v in edit.deltas.items() if not k.startswith("unet.")}
    return Edit(edit.family, edit.unet_config, te_only).apply(model) if te_only else copy.copy(model)


def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0
