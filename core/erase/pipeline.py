"""Concept erasure: ErasePro's progressive pipeline, its zero-residual ablation, and UCE.

docs/method.md, "The ErasePro schedule", "Token features and pairing", "UCE". Methods:

The stages are the model family's (``Family.erase``, docs/method.md, "Model families"); for SD:

- ``erasepro``: text-encoder stages shallow → deep (each layer's ``k_proj``/``v_proj`` by default;
  ``q_proj``, ``out_proj``, ``fc1``, ``fc2`` optional), then the UNet cross-attention ``to_k``/
  ``to_v`` stage. Each stage solves the zero-residual constraint ``W X = W_o Y`` with ``X`` the
  target features entering the layer in the model edited so far and ``Y`` the anchor features in
  the original model.
- ``zero-residual``: the UNet stage alone (no text-encoder stages).
- ``uce``: UCE's closed form on the UNet stage.

Cost (docs/method.md, "Cost of the schedule"): the original encoder runs once over anchor, target
and preserve prompts (all sub-layer inputs captured by hooks); the edited encoder then runs one
layer at a time from a cached hidden state, so the whole schedule costs about two encoder passes.

Reported per edited matrix: ``delta_fro`` = ‖Δ‖_F, ``delta_rel`` = ‖Δ‖_F/‖W_o‖_F,
``residual_before``/``residual_after`` = ‖W X − W_o Y‖_F before/after the edit divided by the
unedited gap ‖W_o (Y − X⁰)‖_F (X⁰: target features of the original model; so earlier stages show
up as ``residual_before`` < 1), and ``rho`` = ‖W'X − W_o Y‖_F / ‖W_o (Y − X)‖_F
(docs/method.md, "Erase report"). ``options.harden_rounds`` hardening rounds re-solve each stage with
its closed-form adversarial inputs added (:mod:`.harden`; docs/method.md, "Hardening rounds").
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from ..edit import Edit
from ..errors import WeightsmithError, require
from ..progress import Steps
from .harden import StageGrams, measure
from .harden import summarize as harden_summary
from .options import METHODS, TE_SUBLAYERS, TOKEN_MODES, EraseOptions, check_method_options  # noqa: F401
from .prompts import PRESERVE_CAPTIONS, concept_kind, fill, templates_for
from .solvers import F64, UCEBasis, ZeroResidualBasis, preserve_matrix
from .tokens import align


@dataclass
class _PromptSet:
    targets: list[str] = field(default_factory=list)
    anchors: list[str] = field(default_factory=list)
    preserve: list[str] = field(default_factory=list)


def _clean(items, flag: str) -> list[str]:
    """Concepts as text, whitespace folded: a string, or a list/tuple of strings (``None`` = none); anything
    else is refused with the sentence the CLI gives for ``flag``."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise WeightsmithError(
            f"concepts for {flag} must be text or a list of texts, got {type(items).__name__} {items!r}."
        )
    bad = [x for x in items if not isinstance(x, str)]
    if bad:
        raise WeightsmithError(
            f'every {flag} must be text, got {bad[0]!r}; pass each concept as a string, e.g. {flag} "van gogh".'
        )
    return [" ".join(x.split()) for x in items]


def validate_concepts(targets, anchors, preserve) -> tuple[list[str], list[str], list[str]]:
    """Boundary checks with messages a user can act on (the same sentences for the CLI and the API)."""
    targets = _clean(targets, "--target")
    anchors = _clean(anchors, "--anchor")
    preserve = [p for p in _clean(preserve, "--preserve") if p]
    require(len(targets) > 0, 'no target concept given; pass at least one --target "concept".')
    require(all(t for t in targets), "a target concept is empty; every --target needs some text.")
    if not anchors:
        anchors = [""]
    if len(anchors) == 1 and len(targets) > 1:
        anchors = anchors * len(targets)
    require(
        len(anchors) == len(targets),
        f"{len(anchors)} anchors for {len(targets)} targets: give one anchor per target, or a single "
        "anchor for all of them.",
    )
    for t, a in zip(targets, anchors):
        require(t.lower() != a.lower(), f"target and anchor are the same ({t!r}); choose a different anchor.")
    both = sorted({p for p in preserve if p.lower() in {t.lower() for t in targets}})
    if both:
        raise WeightsmithError(
            f"{both[0]!r} is both a target and a preserve concept; a concept cannot be erased "
            "and kept at once. Remove it from --preserve or from --target."
        )
    return targets, anchors, preserve


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise WeightsmithError(
            f"{what} holds NaN or infinite values; the model file is damaged (re-download or "
            "repair it). Nothing was written."
        )


def build_prompts(targets, anchors, preserve, opts: EraseOptions, expand: bool) -> _PromptSet:
    ps = _PromptSet()
    for t, a in zip(targets, anchors):
        for tpl in templates_for(concept_kind(a, opts.concept_type), expand, tuple(opts.extra_templates)):
            ps.targets.append(fill(tpl, t))
            ps.anchors.append(fill(tpl, a))
    if preserve:
        for p in preserve:
            for tpl in templates_for(concept_kind("", opts.concept_type), expand):
                ps.preserve.append(fill(tpl, p))
        if opts.preserve_captions:
            ps.preserve += list(PRESERVE_CAPTIONS)
    return ps


# ----------------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _capture(modules: dict[str, torch.nn.Module], run, stop: bool = False) -> dict[str, torch.Tensor]:
    """Inputs of the given modules during ``run()``; ``stop``: end ``run`` as soon as they are all in
    (the rest of the forward pass is not computed)."""
    got: dict[str, torch.Tensor] = {}
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


def gather(feats: torch.Tensor, positions: list[tuple[int, ...]]) -> torch.Tensor:
    """[B, T, d] features -> d × N columns at the given per-prompt positions."""
    cols = [feats[b, list(pos)] for b, pos in enumerate(positions) if pos]
    if not cols:
        return feats.new_zeros(feats.shape[-1], 0)
    return torch.cat(cols, 0).T


def _all_tokens(feats: torch.Tensor) -> torch.Tensor:
    return feats.reshape(-1, feats.shape[-1]).T


def _stat(name, stage, W_o, delta, X, Y, X0, rank, basis, R, factors) -> dict:
    """Report row of one edited matrix (docs/method.md, "Erase report"). The solve's ``R = W_o (Y − X)``
    and the delta's factors ``(up, down)`` are reused, so the residuals cost one product with ``W_o``
    (the unedited gap, skipped when no earlier stage moved the targets)."""
    W_o = W_o.to(F64)
    same = X0 is X  # no earlier stage moved the targets: the unedited gap is R's
    X, Y = X.to(F64), Y.to(F64)
    X0 = X if same else X0.to(F64)
    R = R.to(F64)
    down = factors[1]
    # ΔX through the factors when their rank is below d_in, else through ΔW: never the N × N
    # product down @ X of a UCE basis with more features than dimensions (docs/reliability.md)
    dX = factors[0].to(F64) @ (down.to(F64) @ X) if down.shape[0] < down.shape[1] else delta.to(F64) @ X
    gap = float(R.norm())
    gap0 = gap if same else float((W_o @ (X0 - Y)).norm())
    after = float((dX - R).norm())
    wn = float(W_o.norm())
    dn = float(delta.to(F64).norm())
    return {
        "layer": name,
        "stage": stage,
        "delta_fro": dn,
        "delta_rel": dn / wn if wn else 0.0,
        "residual_before": gap / gap0 if gap0 else 0.0,
        "residual_after": after / gap0 if gap0 else 0.0,
        "rho": after / gap if gap > 0 else 0.0,
        "residual_abs_before": gap,
        "residual_abs_after": after,
        "rank": int(rank),
        "features": int(X.shape[1]),
        "solver": getattr(basis, "solver", "uce"),
        "conditioning": getattr(basis, "kappa", None),
        "solved_columns": int(getattr(basis, "columns", X.shape[1])),
        "exact_rank": getattr(basis, "exact_rank", None),
    }


def _zr_delta(basis, W_o, Xa, Ya):
    return basis.delta(W_o @ (Ya.to(F64) - Xa.to(F64)))


def _solve_stage(
    make_basis, delta_of, X, Y, Xt, weights, P, opts: EraseOptions, stage, group, keep, enc, check=None, final=False
) -> None:
    """Solve one stage (matrices reading the same input), then ``opts.harden_rounds`` hardening rounds
    (docs/method.md, "Hardening rounds"): each round derives the adversarial inputs ``X*`` of the stage
    as edited so far for the target inputs ``Xt`` (:func:`.harden.measure`), appends them to the erase
    set paired with the anchor columns ``Y`` and solves again from the original weights with the same
    solver and preserve set. A report row is measured after every solve (round 0 = the plain edit).
    ``weights``: ``(name, get_W_o)`` pairs; ``keep(name, W_o, delta, up, down, basis)`` receives the
    final solve's matrices. Earlier solves keep only the Gram sums."""
    rounds = int(opts.harden_rounds)
    # without rounds only the final (conditioning) stage is measured (the row every report carries; a text-encoder
    # layer's row costs its Gram sums, about 15% of a full-size erasepro edit for all of them)
    measured = rounds > 0 or final
    Xa, Ya = X, Y
    C = None  # Σ W_oᵀW_o of the stage, from the first solve on
    for r in range(rounds + 1):
        if r and check is not None:
            check()  # a round is a whole solve: cancellable between rounds
        basis = make_basis(Xa, Ya)
        grams = StageGrams(X.shape[0], C, device=X.device)
        for name, get in weights:
            W_o = get()
            delta, up, down = delta_of(basis, W_o, Xa, Ya)
            if measured:
                grams.add(W_o, delta, (up, down))
            if r == rounds:
                keep(name, W_o, delta, up, down, basis)
        if not measured:
            return
        t_r = time.perf_counter()
        row, X_adv = measure(grams, Xt, Y, opts.harden_reg, P)
        enc.hardening.append({"round": r, "stage": stage, "group": group, **row})
        enc.clock["report"] += time.perf_counter() - t_r
        C = grams.C
        if r < rounds:
            Xa = torch.cat([Xa.to(F64), X_adv], 1)
            Ya = torch.cat([Ya.to(F64), Y.to(F64)], 1)


class Encoders:
    """Runs the original and edited text encoders and serves aligned features."""

    def __init__(self, model, ps: _PromptSet, opts: EraseOptions):
        self.model = model
        self.opts = opts
        self.ids_t, self.ids_a, self.ids_p, self.pairs = {}, {}, {}, {}
        for comp, tok in model.tokenizers.items():
            self.ids_t[comp] = model.tokenize(ps.targets, comp)
            self.ids_a[comp] = model.tokenize(ps.anchors, comp)
            self.ids_p[comp] = model.tokenize(ps.preserve, comp) if ps.preserve else None
            eos = tok.eos_token_id
            bos = tok.bos_token_id
            pr = [
                align(t.tolist(), a.tolist(), eos, bos, opts.tokens, opts.max_pad)
                for t, a in zip(self.ids_t[comp], self.ids_a[comp])
            ]
            self.pairs[comp] = ([p.target_pos for p in pr], [p.anchor_pos for p in pr])
        self.hardening: list[dict] = []  # one row per stage and round (docs/method.md, "Hardening rounds")
        self.clock = {"encode": 0.0, "report": 0.0}  # seconds in encoder passes and in report rows
        self._ctx: dict = {}  # (comp, "t"|"a"|"p") -> original conditioning of that prompt set
        self._ctx_edited: dict = {}  # comp -> conditioning of the edited encoder on the targets
        first = next(iter(model.tokenizers))
        require(
            any(self.pairs[first][0]),
            "the target and anchor prompts tokenize identically, so there is nothing to erase; "
            "check the target and anchor texts.",
        )

    def ids(self, comp: str, which: str):
        return {"t": self.ids_t, "a": self.ids_a, "p": self.ids_p}[which][comp]

    def original_pass(self, comp: str, which: str, hooks: dict) -> dict:
        """One pass of the original encoder ``comp`` over prompt set ``which``: the inputs of the
        ``hooks`` modules (by name) are returned and the UNet's conditioning is kept for later."""
        ids = self.ids(comp, which)
        if ids is None:
            return {}
        box = {}

        def run():
            out = self.model.encoder_outputs(comp, ids)
            box["ctx"] = self.model.conditioning_from_outputs(comp, out).float()

        t0 = time.perf_counter()
        feats = _capture(hooks, run)
        self.clock["encode"] += time.perf_counter() - t0
        self._ctx[(comp, which)] = box["ctx"]
        return feats

    def set_edited(self, comp: str, context: torch.Tensor) -> None:
        self._ctx_edited[comp] = context.float()

    def context(self, which: str, edited: bool = False) -> torch.Tensor | None:
        """The denoiser's context of prompt set ``which`` (all encoders' token states, put together
        as the family does), from the cached passes; an encoder not run yet runs now. ``edited``:
        the edited encoders' (targets only)."""
        parts = {}
        for comp in self.model.text_encoders:
            if not self.model.encoder_specs[comp].tokens:
                continue
            if edited and comp in self._ctx_edited:
                parts[comp] = self._ctx_edited[comp]
                continue
            if (comp, which) not in self._ctx:
                if self.ids(comp, which) is None:
                    return None
                self.original_pass(comp, which, {})
            parts[comp] = self._ctx[(comp, which)]
        return self.model.build_conditioning(parts).context

    def n_used_layers(self, comp: str) -> int:
        """How many of the encoder's layers feed the denoiser: every one when its pooled output
        (read from the last layer) does, else those up to the hidden state read."""
        te = self.model.text_encoders[comp]
        L = te.config.num_hidden_layers
        spec = self.model.encoder_specs[comp]
        if spec.pooled:
            return L  # the pooled output reads the last layer
        return L + 1 + spec.layer


def _select_layers(n_used: int, rng) -> list[int]:
    if rng is None:
        return list(range(n_used))
    a, b = rng
    require(0 <= a <= b, f"invalid text-encoder layer range {rng}; use START-END with 0 <= START <= END.")
    return [i for i in range(a, b + 1) if i < n_used]


def _te_stage(
    model, enc: Encoders, stage, opts: EraseOptions, steps: Steps, deltas: dict, factors: dict, stats: list
) -> None:
    """Progressive shallow→deep zero-residual edits of one text encoder (docs/method.md, "The ErasePro
    schedule"); ``stage``: the family's ``EncoderStage`` (which linears of each layer, grouped by
    the input they share)."""
    comp = stage.component
    te_o = model.text_encoders[comp]
    layers_o = model.module(f"{comp}.{stage.layers}")
    edit_layers = _select_layers(enc.n_used_layers(comp), opts.te_layers)
    if not edit_layers:
        return
    # (option name, path) of the selected linears, grouped by the input they share
    groups = [tuple(s for s in g if s[0] in opts.te_sublayers) for g in stage.groups]
    groups = [g for g in groups if g]
    # one pass of the original encoder over anchor / target / preserve prompts, inputs of every
    # group's first module captured at every edited layer
    hook_mods = {(l, g[0][1]): layers_o[l].get_submodule(g[0][1]) for l in edit_layers for g in groups}
    named = {f"{l}:{g}": m for (l, g), m in hook_mods.items()}
    feats_a = enc.original_pass(comp, "a", named)
    feats_t0 = enc.original_pass(comp, "t", named)
    feats_p = enc.original_pass(comp, "p", named)
    tpos, apos = enc.pairs[comp]
    # the edited encoder, one layer at a time from the cached hidden state entering it
    call: dict = {}

    def grab(_m, args, kwargs):
        call["args"], call["kwargs"] = args, kwargs
        raise _Stop

    # the hidden state entering layer 0 (embeddings are never edited, so the original encoder's)
    h0 = layers_o[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            te_o(input_ids=enc.ids_t[comp])
    except _Stop:
        pass
    finally:
        h0.remove()
    args, kwargs = call["args"], call["kwargs"]
    hidden = args[0] if args else kwargs.pop("hidden_states")
    rest = args[1:] if args else ()

    def run_layer(layer, h):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = layer(h, *rest, **kwargs)
        enc.clock["encode"] += time.perf_counter() - t0
        return out[0] if isinstance(out, tuple) else out

    # the UNet reads hidden state ``ctx_at`` (the output of layer ctx_at − 1); run the edited layers
    # at least that far so the edited conditioning comes from this same pass
    spec = model.encoder_specs[comp]
    n_layers = len(layers_o)
    ctx_at = spec.layer if spec.layer >= 0 else n_layers + 1 + spec.layer
    ctx_hidden = hidden if ctx_at == 0 else None
    for l in range(max(max(edit_layers) + 1, ctx_at)):
        # the edited encoder exists one layer at a time: a copy of layer l while it is edited and
        # run, the original layer where nothing is edited (memory: one layer, not a whole encoder)
        layer_e = copy.deepcopy(layers_o[l]) if l in edit_layers else layers_o[l]
        if l in edit_layers:
            for g in groups:
                key = f"{l}:{g[0][1]}"

                # the group's input in the model edited so far: the layer runs only up to that module
                def upto(layer_e=layer_e, hidden=hidden):
                    return run_layer(layer_e, hidden)

                cur = _capture({key: layer_e.get_submodule(g[0][1])}, upto, stop=True)
                X = gather(cur[key], tpos)
                Y = gather(feats_a.pop(key), apos)  # each layer's features are freed once used
                X0 = gather(feats_t0.pop(key), tpos)
                P_l = feats_p.pop(key, None)
                P_cols = _all_tokens(P_l) if P_l is not None else None
                C = preserve_matrix(P_cols, X.shape[0], opts.lam, opts.eta_preserve)

                def make_basis(Xa, _Ya, C=C):
                    return ZeroResidualBasis(
                        Xa, C, opts.rcond, opts.ridge, opts.cond_limit, opts.exact_subspace, opts.merge_tol
                    )

                def keep(sub, W_o, delta, up, down, basis, l=l, layer_e=layer_e, X=X, Y=Y, X0=X0):
                    name = f"{comp}.{stage.canonical_layers}.{l}.{sub}"
                    R = W_o @ (Y.to(F64) - X.to(F64))
                    mod_e = layer_e.get_submodule(sub)
                    with torch.no_grad():
                        mod_e.weight.copy_((W_o + delta).to(mod_e.weight.dtype))
                    deltas[name] = delta.float()
                    factors[name] = (up.float(), down.float())
                    t_r = time.perf_counter()
                    stats.append(
                        _stat(
                            name, f"{comp}.layer{l}", W_o, delta, X, Y, X0, basis.rank, basis, R=R, factors=(up, down)
                        )
                    )
                    enc.clock["report"] += time.perf_counter() - t_r

                weights = [
                    (sub, lambda sub=sub, l=l: layers_o[l].get_submodule(sub).weight.detach().to(F64))
                    for _opt, sub in g
                ]
                _solve_stage(
                    make_basis,
                    _zr_delta,
                    X,
                    Y,
                    X0,
                    weights,
                    P_cols,
                    opts,
                    f"{comp}.layer{l}",
                    g[0][0],
                    keep,
                    enc,
                    steps.check,
                )
                steps.step(f"{comp} layer {l}")
        hidden = run_layer(layer_e, hidden)
        if l + 1 == ctx_at:
            ctx_hidden = hidden
    enc.set_edited(comp, model.conditioning_from_hidden(comp, ctx_hidden))  # final LN: never edited


def _conditioning_stage(
    model,
    stage,
    enc: Encoders,
    ps: _PromptSet,
    method: str,
    opts: EraseOptions,
    steps: Steps,
    deltas: dict,
    factors: dict,
    stats: list,
) -> None:
    """The denoiser's linears that read the context (SD: UNet cross-attention k/v; the family's
    ``ConditioningStage``): zero-residual or UCE, with shared factorisation (docs/method.md, "The
    ErasePro schedule", "UCE")."""
    require(
        stage.reads == "context",
        f"the {model.family_def.label} stage {stage.label} reads the {stage.reads} conditioning, which "
        "this version of the erasure pipeline does not solve for.",
    )
    first = next(iter(model.tokenizers))
    tpos, apos = enc.pairs[first]
    ctx = {k: enc.context(k) for k in ("t", "a", "p")}  # original encoders (cached passes)
    X0 = gather(ctx["t"], tpos)
    Y = gather(ctx["a"], apos)
    P = _all_tokens(ctx["p"]) if ps.preserve else None
    # edited encoders: the conditioning their layer-by-layer run produced (docs/method.md, "Cost of
    # the schedule"); without text-encoder stages it is the original one
    X = gather(enc.context("t", edited=True), tpos) if method == "erasepro" else X0
    X64, Y64 = X.to(F64), Y.to(F64)
    X064 = X64 if X is X0 else X0.to(F64)
    if method == "uce":

        def make_basis(Xa, Ya):
            return UCEBasis(Xa, Ya, P, opts.lam, opts.eta_erase, opts.eta_preserve)

        def delta_of(basis, W_o, Xa, Ya):
            return basis.delta(W_o)

    else:
        C = preserve_matrix(P, X.shape[0], opts.lam, opts.eta_preserve)

        def make_basis(Xa, Ya):
            return ZeroResidualBasis(
                Xa, C, opts.rcond, opts.ridge, opts.cond_limit, opts.exact_subspace, opts.merge_tol
            )

        delta_of = _zr_delta

    def keep(name, W_o, delta, up, down, basis):
        R = W_o @ (Y64 - X64)
        rank = basis.X.shape[1] if method == "uce" else basis.rank
        deltas[name] = delta.float()
        if up.shape[1] < min(W_o.shape):
            factors[name] = (up.float(), down.float())
        t_r = time.perf_counter()
        stats.append(_stat(name, stage.label, W_o, delta, X64, Y64, X064, rank, basis, R=R, factors=(up, down)))
        enc.clock["report"] += time.perf_counter() - t_r
        steps.step(name.split(".", 1)[1])

    def getter(name):
        def get():
            W_o = model.weight(name).to(F64)
            _check_finite(W_o, f"the model's weight {name}")
            return W_o

        return get

    weights = [(name, getter(name)) for name in stage.linears(model, tuple(opts.unet_sublayers))]
    # the adversary's targets: the target conditioning of the original encoders (X0)
    _solve_stage(
        make_basis, delta_of, X, Y, X0, weights, P, opts, stage.label, stage.reads, keep, enc, steps.check, final=True
    )


def erase(
    model,
    targets,
    anchors=("",),
    preserve=(),
    method: str = "erasepro",
    options: EraseOptions | None = None,
    progress=None,
    cancel=None,
    warn=None,
) -> Edit:
    """Erase ``targets`` (each mapped onto its anchor) from ``model``; returns an :class:`Edit`.

    The model is not modified. ``progress(done, total, label)`` and ``cancel() -> bool`` are
    optional callables (see :mod:`weightsmith.core.progress`); ``warn(msg)`` receives warnings such
    as prompt truncation (default: :func:`warnings.warn`).
    """
    import warnings

    t0 = time.perf_counter()
    opts = options or EraseOptions()
    opts.validate()
    require(method in METHODS, f"unknown method {method!r}; use one of {', '.join(METHODS)}.")
    check_method_options(method, opts)
    targets, anchors, preserve = validate_concepts(targets, anchors, preserve)
    expand = opts.expand_prompts if opts.expand_prompts is not None else method != "uce"
    ps = build_prompts(targets, anchors, preserve, opts, expand)
    if getattr(model, "family", None) == "flux":  # docs/flux.md, "Erasure on Flux"
        from .flux import erase_flux

        model.check_prompt_length(
            ps.targets + ps.anchors + ps.preserve, warn or (lambda m: warnings.warn(m, stacklevel=3))
        )
        edit = erase_flux(
            model, ps, method, opts, progress, cancel, stat=_stat, summarize=summarize, solve=_solve_stage
        )
        edit.report.update(
            targets=targets,
            anchors=anchors,
            preserve=preserve,
            hardening_summary=harden_summary(edit.report["hardening"]),
            options={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()},
            time_s=round(time.perf_counter() - t0, 4),
        )
        return edit
    model.check_prompt_length(ps.targets + ps.anchors + ps.preserve, warn or (lambda m: warnings.warn(m, stacklevel=3)))
    for comp, te in model.text_encoders.items():  # inputs checked where they enter
        for n, prm in te.named_parameters():
            _check_finite(prm, f"the model's text-encoder weight {comp}.{n}")
    enc = Encoders(model, ps, opts)
    erase_layout = model.family_def.erase  # the family's stages, shallow → deep
    te_stages = erase_layout.encoder_stages(model) if method == "erasepro" else ()
    n_unet = sum(len(st.linears(model, tuple(opts.unet_sublayers))) for st in erase_layout.conditioning_stages)
    te_plan = {}
    if method == "erasepro":
        for st in te_stages:
            te_plan[st.component] = _select_layers(enc.n_used_layers(st.component), opts.te_layers)
        if opts.te_layers is not None:
            used = {st.component: enc.n_used_layers(st.component) for st in te_stages}
            span = ", ".join(f"{c}: 0-{n - 1}" for c, n in used.items())
            require(
                any(te_plan.values()),
                f"--te-layers {opts.te_layers[0]}-{opts.te_layers[1]} selects no layer the "
                f"UNet reads ({span}); pick a range inside it.",
            )
            if opts.te_layers[1] >= min(used.values()):
                (warn or (lambda m: warnings.warn(m, stacklevel=3)))(
                    f"--te-layers {opts.te_layers[0]}-{opts.te_layers[1]} reaches past the layers the UNet reads "
                    f"({span}); only those are edited."
                )
    steps = Steps(n_unet + sum(len(v) for v in te_plan.values()), progress, cancel)
    steps.check()
    deltas, factors, stats = {}, {}, []
    for st in te_stages:
        _te_stage(model, enc, st, opts, steps, deltas, factors, stats)
    for st in erase_layout.conditioning_stages:
        _conditioning_stage(model, st, enc, ps, method, opts, steps, deltas, factors, stats)
    report = {
        "method": method,
        "family": model.family,
        "targets": targets,
        "anchors": anchors,
        "preserve": preserve,
        "time_s": round(time.perf_counter() - t0, 4),
        # where the time went: encoder passes (original once over every prompt set, edited layers
        # over the targets), the report's rows, and the rest (feature gathering, solves, deltas)
        "timing_s": {
            "encode": round(enc.clock["encode"], 4),
            "report": round(enc.clock["report"], 4),
            "solve": round(time.perf_counter() - t0 - enc.clock["encode"] - enc.clock["report"], 4),
        },
        "prompts": {"targets": ps.targets, "anchors": ps.anchors, "preserve": len(ps.preserve)},
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(opts).items()},
        "stages": stats,
        "summary": summarize(stats),
        "hardening": enc.hardening,
        "hardening_summary": harden_summary(enc.hardening),
    }
    for n, d in deltas.items():  # outputs checked before anyone writes them
        require(
            bool(torch.isfinite(d).all()),
            f"the solve for {n} gave NaN or infinite values; the features are "
            "too ill-conditioned: raise --ridge (e.g. 1e-2) or --rcond.",
        )
    src = getattr(getattr(model, "source", None), "path", None)
    return Edit(
        model.family,
        dict(model.unet_config),
        deltas,
        factors,
        report,
        {"the input model": src} if src is not None else {},
    )


def summarize(stats: list[dict]) -> list[dict]:
    """Per-stage aggregates: total ‖Δ‖ relative to ‖W_o‖ and the worst ρ of the stage."""
    out, order = {}, []
    for s in stats:
        k = s["stage"]
        if k not in out:
            order.append(k)
            out[k] = {
                "stage": k,
                "matrices": 0,
                "delta_rel_mean": 0.0,
                "rho_max": 0.0,
                "residual_before_mean": 0.0,
                "residual_after_mean": 0.0,
            }
        o = out[k]
        o["matrices"] += 1
        o["delta_rel_mean"] += s["delta_rel"]
        o["rho_max"] = max(o["rho_max"], s["rho"])
        o["residual_before_mean"] += s["residual_before"]
        o["residual_after_mean"] += s["residual_after"]
    for o in out.values():
        n = o["matrices"]
        for f in ("delta_rel_mean", "residual_before_mean", "residual_after_mean"):
            o[f] /= n
    return [out[k] for k in order]
