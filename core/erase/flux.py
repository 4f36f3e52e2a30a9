"""Concept erasure on Flux.1 (docs/flux.md, "Erasure on Flux").

The stages are the Flux family's (:mod:`weightsmith.core.families.flux`): ErasePro's progressive T5
stage (T5 blocks shallow → deep), then the transformer's text-only input projections,
``context_embedder`` (BFL ``txt_in``; each T5 token) and ``time_text_embed.text_embedder.linear_1``
(``vector_in.in_layer``; CLIP-L's pooled vector). Methods:

- ``uce``: UCE's closed form on the two projections, features as the public ``uce_flux_edit.py``
  takes them: one T5 vector per prompt at index ``(real tokens incl. </s>) − 2`` (the prompt's last
  token; for the empty guide, wrapping to the last padding position), one CLIP pooled vector per
  prompt; preserved prompts the same way. Unlike the script, the targets are ``W_o c*`` without the
  bias (the script's ``module(c*)`` adds ``b`` once more to every erased and preserved output:
  docs/flux.md, "Differences from the official UCE Flux script").
- ``zero-residual``: the zero-residual solve on the two projections alone (T5 unedited).
- ``erasepro``: T5 blocks one at a time (each block's selected linears solve ``W X = W_o Y`` with
  ``X`` the target features entering them in T5 edited so far, ``Y`` the anchors' in the original),
  then the two projections with the edited T5's output as ``X``.

T5 is bidirectional, so every position of a target prompt carries the concept: the T5 and
``txt_in`` stages pair the common prefix position by position too, then the concept span and the
suffix as :func:`.tokens.align` does (``--tokens last``: one pair). T5 runs layer by layer: one block
in float32 at a time, whatever the encoder's size (docs/flux.md, "How Weightsmith holds a Flux model").
Every stage is solved by the pipeline's stage solve (passed in as ``solve``), so hardening rounds apply
to Flux as to SD (docs/flux.md, "Erasure on Flux"; docs/method.md, "Hardening rounds").
"""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import torch

from ..edit import Edit
from ..errors import require
from ..families.flux import CONDITIONING_STAGES, ERASE, T5_STAGE, stage_linears
from ..progress import Steps
from .options import EraseOptions
from .solvers import F64, UCEBasis, ZeroResidualBasis, preserve_matrix
from .tokens import align

T5_PAD, T5_EOS = 0, 1


class _Stop(Exception):
    pass


def _capture(modules: dict, run, stop: bool = False) -> dict:
    got = {}
    hooks = []
    for name, mod in modules.items():

        def pre(_m, args, _name=name):
            got[_name] = args[0].detach()
            if stop and len(got) == len(modules):
                raise _Stop

        hooks.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            run()
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return got


def script_index(ids: torch.Tensor) -> int:
    """The public UCE Flux script's feature index in a padded T5 encoding: ``attention_mask.sum() − 2``
    (real tokens incl. ``</s>``, minus 2), Python-wrapped: the prompt's last token, or for an empty
    prompt the last padding position."""
    n = int((ids != T5_PAD).sum())
    return (n - 2) % ids.shape[0]


def t5_pairs(t_ids: torch.Tensor, a_ids: torch.Tensor, mode: str, max_pad) -> tuple[tuple, tuple]:
    """Paired T5 positions of a target and its anchor prompt: :func:`.tokens.align`'s concept span and
    suffix, plus (``suffix`` mode) the common prefix position by position (T5 is bidirectional)."""
    t, a = t_ids.tolist(), a_ids.tolist()
    p = align(t, a, T5_EOS, None, mode, max_pad)
    if mode != "suffix" or not p.target_pos:
        return p.target_pos, p.anchor_pos
    s = min(p.target_pos)  # the concept starts after the common prefix
    return tuple(range(s)) + p.target_pos, tuple(range(s)) + p.anchor_pos


def _gather(feats: torch.Tensor, positions) -> torch.Tensor:
    cols = [feats[b, list(pos)] for b, pos in enumerate(positions) if pos]
    if not cols:
        return feats.new_zeros(feats.shape[-1], 0)
    return torch.cat(cols, 0).T


def _all_tokens(feats: torch.Tensor | None):
    return None if feats is None else feats.reshape(-1, feats.shape[-1]).T


def _zr_delta(basis, W_o, Xa, Ya):
    return basis.delta(W_o @ (Ya.to(F64) - Xa.to(F64)))


def erase_flux(
    model, ps, method: str, opts: EraseOptions, progress=None, cancel=None, stat=None, summarize=None, solve=None
) -> Edit:
    """Erase on a :class:`~weightsmith.core.fluxmodel.FluxModel` with the prompt sets ``ps`` (targets,
    anchors, preserve, already expanded); ``stat``/``summarize``: the erase report's row and summary
    functions, ``solve``: the pipeline's stage solve with its hardening rounds (:mod:`.pipeline`,
    docs/method.md, "Hardening rounds"). Returns an :class:`~weightsmith.core.edit.Edit` with canonical
    names; its report's ``hardening`` holds a row per stage and round."""
    t0 = time.perf_counter()
    model.require_text_encoders("erasure on Flux")
    T5c = "text_encoder_2"
    ids = {
        w: (model.tokenize(p, T5c) if p else None)
        for w, p in (("t", ps.targets), ("a", ps.anchors), ("p", ps.preserve))
    }
    if method == "uce":
        tpos = [(script_index(r),) for r in ids["t"]]
        apos = [(script_index(r),) for r in ids["a"]]
    else:
        pr = [t5_pairs(t, a, opts.tokens, opts.max_pad) for t, a in zip(ids["t"], ids["a"])]
        tpos, apos = [p[0] for p in pr], [p[1] for p in pr]
    require(any(tpos), "the target and anchor prompts tokenize identically, so there is nothing to erase.")
    stages = ERASE.encoder_stages(model) if method == "erasepro" else ()
    t5 = model.t5
    layers = list(range(t5.n_layers))
    if opts.te_layers is not None:
        a, b = opts.te_layers
        layers = [i for i in layers if a <= i <= b]
        require(bool(layers) or not stages, f"--te-layers {a}-{b} selects no T5 layer (T5 has 0-{t5.n_layers - 1}).")
    n_steps = (len(layers) if stages else 0) + len(CONDITIONING_STAGES)
    steps = Steps(n_steps, progress, cancel)
    steps.check()
    rec = SimpleNamespace(hardening=[], clock={"encode": 0.0, "report": 0.0})  # what solve() records
    clock = rec.clock
    deltas, factors, stats = {}, {}, []
    words = {path: word for g in T5_STAGE.groups for word, path in g}  # --te-sublayers word of each linear

    # T5, layer by layer: original hidden states of every prompt set, and the edited targets'
    def emb(w):
        return None if ids[w] is None else t5.embed(ids[w])

    h = {w: emb(w) for w in ("t", "a", "p")}
    h_edit = h["t"]
    bias = None
    stage = stages[0] if stages else None
    for i in range(t5.n_layers):
        tc = time.perf_counter()
        blk = t5.block(i)
        groups = stage_linears(stage, i, opts.te_sublayers) if (stage is not None and i in layers) else []
        hooks = {g[0][1]: blk.get_submodule(g[0][1]) for g in groups}
        feats = {}
        new_h = {}
        new_bias = bias
        for w in ("a", "t", "p"):
            if h[w] is None:
                continue
            box = {}

            def run(w=w, box=box, blk=blk, h=h, bias=bias):
                box["out"] = t5.run_block(blk, h[w], bias)

            feats[w] = _capture(hooks, run) if hooks else (run() or {})
            new_h[w], new_bias = box["out"]
        clock["encode"] += time.perf_counter() - tc
        if groups:
            blk_e = copy.deepcopy(blk)
            for g in groups:
                path0 = g[0][1]

                def upto(blk_e=blk_e, h_edit=h_edit, bias=bias):
                    t5.run_block(blk_e, h_edit, bias)

                cur = _capture({path0: blk_e.get_submodule(path0)}, upto, stop=True)
                X = _gather(cur[path0], tpos)
                Y = _gather(feats["a"][path0], apos)
                X0 = _gather(feats["t"][path0], tpos)
                P = _all_tokens(feats["p"][path0]) if "p" in feats else None
                C = preserve_matrix(P, X.shape[0], opts.lam, opts.eta_preserve)
                paths = dict(g)

                def make_basis(Xa, _Ya, C=C):
                    return ZeroResidualBasis(
                        Xa, C, opts.rcond, opts.ridge, opts.cond_limit, opts.exact_subspace, opts.merge_tol
                    )

                def keep(name, W_o, delta, up, down, basis, i=i, blk_e=blk_e, X=X, Y=Y, X0=X0, paths=paths):
                    mod = blk_e.get_submodule(paths[name])
                    with torch.no_grad():
                        mod.weight.copy_((W_o + delta).to(mod.weight.dtype))
                    deltas[name] = delta.float()
                    factors[name] = (up.float(), down.float())
                    R = W_o @ (Y.to(F64) - X.to(F64))
                    t_r = time.perf_counter()
                    stats.append(
                        stat(name, f"{T5c}.layer{i}", W_o, delta, X, Y, X0, basis.rank, basis, R=R, factors=(up, down))
                    )
                    rec.clock["report"] += time.perf_counter() - t_r

                weights = [(name, lambda i=i, path=path: t5.weight(i, path).to(F64)) for name, path in g]
                solve(
                    make_basis,
                    _zr_delta,
                    X,
                    Y,
                    X0,
                    weights,
                    P,
                    opts,
                    f"{T5c}.layer{i}",
                    words[path0],
                    keep,
                    rec,
                    steps.check,
                )
            tc = time.perf_counter()
            h_edit, _ = t5.run_block(blk_e, h_edit, bias)
            clock["encode"] += time.perf_counter() - tc
            steps.step(f"T5 layer {i}")
        else:
            h_edit = new_h["t"] if h_edit is h["t"] else t5.run_block(blk, h_edit, bias)[0]
        h = {w: new_h.get(w) for w in ("t", "a", "p")}
        bias = new_bias
        # drop every reference to this layer's blocks (the hook closures hold them too) before the next
        # one is built: one T5-XXL block is 0.8 GB in float32
        blk = blk_e = run = upto = hooks = feats = keep = weights = None
    out = {w: (None if h[w] is None else t5.final_norm(h[w])) for w in h}
    out_edit = t5.final_norm(h_edit)

    # the transformer's text-input projections
    pooled = {
        w: (model.clip_pooled(p) if p else None) for w, p in (("t", ps.targets), ("a", ps.anchors), ("p", ps.preserve))
    }
    for cs in CONDITIONING_STAGES:
        for name in cs.linears(model):
            if cs.reads == "context":
                X = _gather(out_edit, tpos)
                X0 = _gather(out["t"], tpos)
                Y = _gather(out["a"], apos)
                if method == "uce":
                    P = (
                        None
                        if out["p"] is None
                        else torch.stack([out["p"][b, script_index(r)] for b, r in enumerate(ids["p"])], 1)
                    )
                else:
                    P = _all_tokens(out["p"])
            else:
                X = X0 = pooled["t"].T
                Y = pooled["a"].T
                P = None if pooled["p"] is None else pooled["p"].T
            X64, Y64, X064 = X.to(F64), Y.to(F64), X0.to(F64)
            if method == "uce":

                def make_basis(Xa, Ya, P=P):
                    return UCEBasis(Xa, Ya, P, opts.lam, opts.eta_erase, opts.eta_preserve)

                def delta_of(basis, W_o, Xa, Ya):
                    return basis.delta(W_o)

            else:
                Cp = preserve_matrix(P, X.shape[0], opts.lam, opts.eta_preserve)

                def make_basis(Xa, _Ya, Cp=Cp):
                    return ZeroResidualBasis(
                        Xa, Cp, opts.rcond, opts.ridge, opts.cond_limit, opts.exact_subspace, opts.merge_tol
                    )

                delta_of = _zr_delta

            def keep(name, W_o, delta, up, down, basis, X64=X64, Y64=Y64, X064=X064, cs=cs):
                R = W_o @ (Y64 - X64)
                rank = basis.X.shape[1] if method == "uce" else basis.rank
                deltas[name] = delta.float()
                if up.shape[1] < min(W_o.shape):
                    factors[name] = (up.float(), down.float())
                t_r = time.perf_counter()
                stats.append(stat(name, cs.label, W_o, delta, X64, Y64, X064, rank, basis, R=R, factors=(up, down)))
                rec.clock["report"] += time.perf_counter() - t_r

            def get(name=name):
                W_o = model.weight(name).to(F64)
                require(
                    bool(torch.isfinite(W_o).all()),
                    f"the model's weight {name} holds NaN or infinite values; the file is damaged.",
                )
                return W_o

            # the adversary's targets: the original T5's / CLIP's target features (X0)
            solve(
                make_basis,
                delta_of,
                X,
                Y,
                X0,
                [(name, get)],
                P,
                opts,
                cs.label,
                cs.reads,
                keep,
                rec,
                steps.check,
                final=True,
            )
        steps.step(cs.label)
    for n, d in deltas.items():
        require(
            bool(torch.isfinite(d).all()),
            f"the solve for {n} gave NaN or infinite values; the features are too ill-conditioned: raise --ridge.",
        )
    report = {
        "method": method,
        "family": "flux",
        "variant": model.variant,
        "t5_tokens": model.tokenizers[T5c].model_max_length,
        "time_s": round(time.perf_counter() - t0, 4),
        "timing_s": {"encode": round(clock["encode"], 4), "report": round(clock["report"], 4)},
        "prompts": {"targets": ps.targets, "anchors": ps.anchors, "preserve": len(ps.preserve)},
        "stages": stats,
        "summary": summarize(stats),
        "hardening": rec.hardening,
    }
    src = getattr(getattr(model, "source", None), "path", None)
    sources = {"the input model": src} if src is not None else {}
    for c, p in getattr(getattr(model, "source", None), "text_encoder_files", {}).items():
        sources[f"the text-encoder file ({c})"] = p
    return Edit("flux", {}, deltas, factors, report, sources)
