"""The three white-box attacks on an edited model (docs/robustness.md, "The attacks").

- ``continuous``: ``k`` token embeddings at the prompt's ``{}`` slot, learnt with Adam so that the
  edited model's denoising loss on images of the target drawn by the unedited model is minimal
  (concept inversion; UnlearnDiffAtk). Each step draws fresh (timestep, noise) pairs from a seeded
  generator; the loss is also read before and after on a fixed set of draws.
- ``discrete``: ``k`` typed words at the slot. Each round takes one slot position, scores every
  vocabulary token by the one-hot gradient of the fixed-set loss (``∇_e L · E``, summed over the
  text encoders), tries the best-scored ``candidates`` that type back as that one token and keeps the
  best if it lowers the loss (greedy; P4D-K, UnlearnDiffAtk-discrete). The loss never rises.
- ``closed-form``: the UNet conditioning that the edited cross-attention ``to_k``/``to_v`` map closest
  to the unedited model's keys and values of the target prompt, ridge-pulled toward zero (RECE's
  ``close_regzero``): ``c* = (Σ W'ᵀW' + λI)⁻¹ Σ W'ᵀW_o c``, fed to the UNet directly.

All three are seeded and deterministic on a CPU, cancellable (``cancel()``) and report progress
(:class:`weightsmith.core.progress.Steps`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import WeightsmithError, require
from ..progress import CancelFn, ProgressFn, Steps
from .engine import (
    Targets,
    check_pair,
    denoise_loss,
    draw_targets,
    encode,
    fill,
    guidance_for,
    make_draws,
    slot_starts,
    split_template,
    token_embedding,
)
from .options import ATTACKS, AttackOptions

F64 = torch.float64


@dataclass
class AttackResult:
    """What an attack found: the typed words (discrete; continuous: where it started), the learnt
    embeddings (continuous), the loss trace and the fixed-set losses: ``loss_base`` (the unedited model
    on the plain target prompt), ``loss_plain`` (the edited model on it), ``loss_start`` and
    ``loss_final`` (the edited model under the attack at its start and its end)."""

    kind: str
    target: str
    templates: list[str]
    words: list[str] | None = None
    start_words: list[str] | None = None  # the seeded words the discrete and continuous attacks start from
    embeddings: dict[str, torch.Tensor] | None = None
    reg: float | None = None
    loss_trace: list[float] = field(default_factory=list)
    loss_base: float = float("nan")
    loss_plain: float = float("nan")
    loss_start: float = float("nan")
    loss_final: float = float("nan")
    time_s: float = 0.0
    options: dict = field(default_factory=dict)
    target_seeds: list[int] = field(default_factory=list)

    @property
    def prompt(self) -> str | None:
        """The discrete attack's prompt as a user types it (the first template, filled)."""
        return fill(self.templates[0], " ".join(self.words)) if self.kind == "discrete" and self.words else None

    def prompts(self, templates: list[str]) -> list[str]:
        """``templates`` filled the way this attack fills them (the words, or the target for closed-form)."""
        words = self.target if self.kind == "closed-form" else " ".join(self.words or [])
        return [fill(t, words) for t in templates]

    def conditioning(self, base, edited, templates: list[str]):
        """The conditioning this attack feeds ``edited``'s UNet for each template (no gradients)."""
        with torch.no_grad():
            if self.kind == "discrete":
                return encode(edited, self.prompts(templates))
            if self.kind == "closed-form":
                return closed_form_conditioning(base, edited, self.prompts(templates), self.reg)
            k = len(self.words)
            return encode(
                edited, self.prompts(templates), slot_starts(edited, templates, k, self.words), self.embeddings
            )

    def summary(self) -> dict:
        """The JSON-able part (embeddings as their norms; they are in :meth:`tensors`)."""
        return {
            "attack": self.kind,
            "target": self.target,
            "templates": self.templates,
            "prompt": self.prompt,
            "words": self.words,
            "start_words": self.start_words,
            "embedding_norms": (
                {c: [float(x) for x in e.norm(dim=-1)] for c, e in self.embeddings.items()} if self.embeddings else None
            ),
            "reg": self.reg,
            "loss_base": self.loss_base,
            "loss_plain": self.loss_plain,
            "loss_start": self.loss_start,
            "loss_final": self.loss_final,
            "loss_trace": self.loss_trace,
            "time_s": round(self.time_s, 3),
            "options": self.options,
            "target_seeds": [self.target_seeds[0], self.target_seeds[-1]] if self.target_seeds else [],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The learnt embeddings as ``{"<encoder>.slot": [k, width]}`` (safetensors-ready)."""
        return {f"{c}.slot": e.detach().float().contiguous() for c, e in (self.embeddings or {}).items()}


# ----------------------------------------------------------------------------------------------
def _typable(tok, tid: int, exclude: set[str]) -> str | None:
    """The word a user types for vocabulary token ``tid`` when it types back as that one token (a whole
    ASCII letters-and-digits word, not excluded), else None."""
    s = tok.convert_ids_to_tokens(int(tid))
    if not isinstance(s, str) or not s.endswith("</w>"):
        return None
    w = s[: -len("</w>")]  # byte-level symbols of ASCII letters and digits are the characters themselves
    if not w or not w.isascii() or not w.isalnum() or w.lower() in exclude:
        return None
    return w if list(tok(w).input_ids[1:-1]) == [int(tid)] else None


class Vocabulary:
    """The typable words of the first tokenizer, found lazily (a full CLIP vocabulary has 49 408)."""

    def __init__(self, model, exclude=()):
        self.comp, self.tok = next(iter(model.tokenizers.items()))
        self.exclude = {w.lower() for e in exclude for w in e.split()}
        self.size = len(self.tok)
        self._cache: dict[int, str | None] = {}

    def word(self, tid: int) -> str | None:
        tid = int(tid)
        if tid not in self._cache:
            self._cache[tid] = _typable(self.tok, tid, self.exclude) if 0 <= tid < self.size else None
        return self._cache[tid]

    def random_words(self, k: int, gen: torch.Generator) -> list[str]:
        out = []
        for tid in torch.randperm(self.size, generator=gen).tolist():
            w = self.word(tid)
            if w is not None:
                out.append(w)
                if len(out) == k:
                    return out
        raise WeightsmithError("the tokenizer has too few whole-word tokens for the attack's slot; lower --tokens.")


def _slot_embeddings(model, words: list[str]) -> dict[str, torch.Tensor]:
    """The token embeddings of ``words`` in every text encoder: {encoder: [k, width]}."""
    out = {}
    for comp, te in model.text_encoders.items():
        ids = [i for w in words for i in model.tokenizers[comp](w).input_ids[1:-1]]
        W = token_embedding(te).weight
        out[comp] = W.detach()[torch.tensor(ids, device=W.device)].float().clone()
    return out


def _plain_losses(base, edited, targets: Targets, draws) -> tuple[float, float]:
    with torch.no_grad():
        prompts = [fill(targets.templates[i], targets.target) for i in draws.idx.tolist()]
        lb = float(denoise_loss(base, draws, encode(base, prompts)))
        lp = float(denoise_loss(edited, draws, encode(edited, prompts)))
    return lb, lp


def _draw_templates(targets: Targets, draws) -> list[str]:
    return [targets.templates[i] for i in draws.idx.tolist()]


def run_continuous(base, edited, targets: Targets, opts: AttackOptions, words: list[str], fixed, steps: Steps):
    tpls = _draw_templates(targets, fixed)
    k = len(words)
    starts_fixed = slot_starts(edited, tpls, k, words)
    prompts_fixed = [fill(t, " ".join(words)) for t in tpls]
    params = {c: torch.nn.Parameter(e) for c, e in _slot_embeddings(edited, words).items()}
    scale = {
        c: float(token_embedding(te).weight.detach().float().norm(dim=-1).mean())
        for c, te in edited.text_encoders.items()
    }
    opt = torch.optim.Adam([{"params": [p], "lr": opts.lr * scale[c]} for c, p in params.items()])

    def fixed_loss():
        with torch.no_grad():
            return float(denoise_loss(edited, fixed, encode(edited, prompts_fixed, starts_fixed, params)))

    start = fixed_loss()
    gen = torch.Generator().manual_seed(opts.seed * 7919 + 2)
    trace = []
    for i in range(opts.steps):
        mb = make_draws(base, targets, opts.draws, gen, opts.loss == "teacher")
        mt = _draw_templates(targets, mb)
        loss = denoise_loss(
            edited,
            mb,
            encode(edited, [fill(t, " ".join(words)) for t in mt], slot_starts(edited, mt, k, words), params),
        )
        grads = torch.autograd.grad(loss, list(params.values()))
        for p, g in zip(params.values(), grads):
            p.grad = g
        opt.step()
        trace.append(loss.item())
        steps.step(f"continuous {i + 1}/{opts.steps}: loss {trace[-1]:.4f}")
    emb = {c: p.detach().clone() for c, p in params.items()}
    return emb, trace, start, fixed_loss()


def _onehot_scores(edited, vocab: Vocabulary, grads: dict, pos: int) -> torch.Tensor:
    """Per vocabulary token of the first tokenizer: ∇_e L · e_token at slot position ``pos``, summed over the
    encoders whose vocabulary is the first's (lower = the loss falls more, to first order)."""
    first = vocab.comp
    ref = edited.tokenizers[first].get_vocab()
    total = None
    for comp, g in grads.items():
        if comp != first and edited.tokenizers[comp].get_vocab() != ref:
            continue
        W = token_embedding(edited.text_encoders[comp]).weight.detach().float()
        s = W @ g[pos].float()
        total = s if total is None else total + s
    return total


def run_discrete(base, edited, targets: Targets, opts: AttackOptions, words: list[str], fixed, vocab, steps: Steps):
    tpls = _draw_templates(targets, fixed)
    k = len(words)

    def loss_of(ws):
        with torch.no_grad():
            return float(denoise_loss(edited, fixed, encode(edited, [fill(t, " ".join(ws)) for t in tpls])))

    cur = loss_of(words)
    start = cur
    trace = []
    for i in range(opts.steps):
        pos = i % k
        starts = slot_starts(edited, tpls, k, words)
        leaf = {c: e.requires_grad_(True) for c, e in _slot_embeddings(edited, words).items()}
        loss = denoise_loss(edited, fixed, encode(edited, [fill(t, " ".join(words)) for t in tpls], starts, leaf))
        grads = dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values()))))
        scores = _onehot_scores(edited, vocab, grads, pos)
        tried = []
        for tid in torch.argsort(scores, stable=True).tolist():
            w = vocab.word(tid)
            if w is None or w == words[pos]:
                continue
            tried.append(w)
            if len(tried) == opts.candidates:
                break
        best, best_w = cur, None
        for w in tried:
            steps.check()
            trial = words[:pos] + [w] + words[pos + 1 :]
            lw = loss_of(trial)
            if lw < best:
                best, best_w = lw, w
        if best_w is not None:
            words = words[:pos] + [best_w] + words[pos + 1 :]
            cur = best
        trace.append(cur)
        steps.step(f"discrete {i + 1}/{opts.steps}: loss {cur:.4f}")
    return words, trace, start, cur


def kv_pairs(base, edited):
    """``(W_o, W')`` of every UNet cross-attention ``to_k``/``to_v`` (float64)."""
    for b in base.unet_cross_attention_names():
        for s in ("to_k", "to_v"):
            yield base.weight(f"{b}.{s}").to(F64), edited.weight(f"{b}.{s}").to(F64)


def closed_form_map(base, edited, reg: float) -> torch.Tensor:
    """``M = (Σ W'ᵀW' + λI)⁻¹ Σ W'ᵀW_o`` (d × d, float64) with ``λ = reg · tr(Σ W'ᵀW') / d``: the
    adversarial conditioning of a token whose original conditioning is ``c`` is ``M c``."""
    A = B = None
    for W, Wn in kv_pairs(base, edited):
        a, b = Wn.T @ Wn, Wn.T @ W
        A, B = (a, b) if A is None else (A + a, B + b)
    require(A is not None, "the model has no UNet cross-attention; the closed-form attack needs one.")
    d = A.shape[0]
    lam = float(reg) * float(torch.trace(A)) / d
    return torch.linalg.solve(A + lam * torch.eye(d, dtype=F64), B)


def closed_form_conditioning(base, edited, prompts: list[str], reg: float):
    """The closed-form adversarial conditioning of ``prompts``: every token of the unedited model's
    conditioning ``c`` replaced by the input the edited cross-attention ``to_k``/``to_v`` map closest to
    ``W_o c`` (ridge ``reg`` toward zero). Computed by the hardening rounds' own closed form
    (:func:`weightsmith.core.erase.harden.adversarial_inputs`, docs/method.md "Hardening rounds") where this
    build has it, else by :func:`closed_form_map` (the same formula). The pooled output (SDXL) stays the
    unedited one."""
    with torch.no_grad():
        ctx, pooled = encode(base, prompts)
    import importlib

    try:  # hardening is its own feature; like core/cli.py's sub-commands, it may not be part of this build
        adversarial_inputs = importlib.import_module("..erase.harden", __package__).adversarial_inputs
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("weightsmith"):
            raise
        M = closed_form_map(base, edited, reg)
        return (ctx.to(F64) @ M.T).float(), pooled
    pairs = list(kv_pairs(base, edited))
    require(pairs, "the model has no UNet cross-attention; the closed-form attack needs one.")
    X = adversarial_inputs([Wn for _, Wn in pairs], [W for W, _ in pairs], ctx.reshape(-1, ctx.shape[-1]).T, reg)
    return X.T.reshape(ctx.shape).float(), pooled


# ----------------------------------------------------------------------------------------------
def attack(
    base,
    edited,
    target: str,
    kind: str = "continuous",
    options: AttackOptions | None = None,
    templates=("{}",),
    targets: Targets | None = None,
    exclude=None,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> AttackResult:
    """Attack ``edited`` (an edit of ``base``) to bring ``target`` back (module docstring). ``templates``:
    prompts with a ``{}`` slot (the adversarial tokens go there; ``{}`` alone by default); ``targets``:
    images of the target already drawn by ``base`` (:func:`..engine.draw_targets`; drawn here from the
    templates with the target in the slot when absent); ``exclude``: words the discrete attack may not
    type (default: the target's words)."""
    opts = options or AttackOptions()
    opts.validate()
    require(kind in ATTACKS, f"unknown attack {kind!r}; choose from {', '.join(ATTACKS)}.")
    require(isinstance(target, str) and target.strip(), 'the attack needs the erased concept: --target "concept".')
    templates = list([templates] if isinstance(templates, str) else templates)
    require(templates, "the attack needs at least one prompt template with {}.")
    for t in templates:
        split_template(t)
    check_pair(base, edited)
    t0 = time.perf_counter()
    n_steps = 1 + (0 if kind == "closed-form" else opts.steps)
    steps = Steps(n_steps, progress, cancel)
    steps.start(f"{kind}: drawing {opts.images} target images")
    if targets is None:
        seeds = [50_000 + 10_000 * opts.seed + i for i in range(opts.images)]
        g = guidance_for(base, opts.guidance)
        targets = draw_targets(base, target, templates, seeds, opts.draw_steps, g, check=steps.check)
    steps.step("target images drawn")
    teach = opts.loss == "teacher"
    fixed = make_draws(base, targets, opts.draws, torch.Generator().manual_seed(opts.seed * 7919 + 1), teach)
    loss_base, loss_plain = _plain_losses(base, edited, targets, fixed)
    res = AttackResult(
        kind,
        target,
        templates,
        loss_base=loss_base,
        loss_plain=loss_plain,
        options=dict(vars(opts)),
        target_seeds=list(targets.seeds),
    )
    if kind == "closed-form":
        res.reg = float(opts.reg)
        with torch.no_grad():
            cond = closed_form_conditioning(
                base, edited, [fill(targets.templates[i], target) for i in fixed.idx.tolist()], opts.reg
            )
            res.loss_start = loss_plain
            res.loss_final = float(denoise_loss(edited, fixed, cond))
        res.loss_trace = [res.loss_start, res.loss_final]
    else:
        vocab = Vocabulary(edited, [target] if exclude is None else exclude)
        words = vocab.random_words(opts.tokens, torch.Generator().manual_seed(opts.seed * 7919 + 3))
        res.start_words = list(words)
        if kind == "continuous":
            res.words = words
            res.embeddings, res.loss_trace, res.loss_start, res.loss_final = run_continuous(
                base, edited, targets, opts, words, fixed, steps
            )
        else:
            res.words, res.loss_trace, res.loss_start, res.loss_final = run_discrete(
                base, edited, targets, opts, words, fixed, vocab, steps
            )
    res.time_s = time.perf_counter() - t0
    return res


__all__ = ["AttackResult", "attack", "closed_form_map", "closed_form_conditioning", "Vocabulary"]
