"""IterIS: iterative inference-solving LoRA merging (docs/method.md, "LoRA merging").

For every module touched by any input LoRA, with ``ΔW_i = s_i·up_i·down_i`` (``s_i = alpha/r``)::

    ΔW* = ( Σ_i λ_i m_i ΔW_i (C_i + α₁‖C_i‖I) ) ( Σ_i λ_i m_i (H_i + α₂‖H_i‖I) )⁻¹

with ``C_i = X_iᵀX̃_i`` and ``H_i = X̃_iᵀX̃_i`` streamed through hooks (:mod:`.stats`), ``X_i`` the
module's inputs under "base + LoRA i" and ``X̃_i`` under "base + current merge" on LoRA i's samples
(:mod:`.sampling`). Iteration 0 uses ``X̃_i = X_i`` (``C = H = G``). Jacobi schedule: one paired
pass over all samples refreshes every module's statistics, then every module is solved
("IterIS loop and convergence").
A LoRA that does not touch a module has no say in that module's solve by default
(``MergeOptions.untouched = "skip"``, this project's design); with ``"zero"`` it enters the ``H`` sum
with ``ΔW_i = 0`` (it asks the merge to leave its inputs' outputs unchanged there), the paper's
objective read literally. Measured on the embedded world (subject LoRA without conv adapters + style
LoRA with them, ridge 1e-4), ``"zero"`` cancelled the style's conv adapters: stripes 0/14 vs 6/14 with
``"skip"``.

The result is exact low-rank ("IterIS exact LoRA export"):
``ΔW* = [λ₁m₁s₁up₁ | …] · [down₁C₁M⁻¹ ; …]`` of rank ``Σ r_i``, stored in ``Edit.factors``. All Gram
sums and solves are float64 (float64 on the CPU when the model runs on MPS, which has no float64).

The objective reported per iteration is the weighted, ridge-free one,
``J(ΔW) = Σ_modules Σ_i λ_i m_i ‖X_i ΔW_iᵀ − X̃_i ΔWᵀ‖²``, evaluated with the ``X̃`` of the merge
``ΔW`` itself (needs the next paired pass), from the statistics:
``‖XΔW_iᵀ‖² − 2 tr(ΔW_i C ΔWᵀ) + tr(ΔW H ΔWᵀ)``.
"""
from __future__ import annotations

import time

import torch

from ..edit import Edit
from .options import MergeOptions
from .sampling import SamplingProtocol, is_context_only
from .stats import DeltaHooks, GramStats


def _gram_device(model):
    p = next(iter(model.text_encoders.values())).parameters().__next__()
    return torch.device("cpu") if p.device.type == "mps" else p.device


def lora_factors(lora, device="cpu") -> dict:
    """module -> (s·up, down) as float64 2-D tensors."""
    return {n: ((m.scale * m.up.double()).to(device), m.down.double().to(device)) for n, m in lora.modules.items()}


def _tr_prod(A, B):
    """tr(A B) for square A, B of the same size (= sum(A ⊙ Bᵀ))."""
    return float((A * B.t()).sum())


def _solve_sym(M, B):
    """X with M X = B for symmetric M; Cholesky, else least squares (returns (X, fell_back))."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        X = torch.cholesky_solve(B, L)
        if bool(torch.isfinite(X).all()):
            return X, False
    if M.device.type == "cpu":
        X = torch.linalg.lstsq(M, B, driver="gelsd").solution
    else:
        X = torch.linalg.pinv(M, hermitian=True) @ B
    return X, True


class IterISSolver:
    """The IterIS loop on one model. ``loras``: mapped :class:`~weightsmith.core.lora_read.LoRA` objects;
    ``weights``: m_i; ``samples``: per-LoRA lists of :class:`~.sampling.Sample`."""

    def __init__(self, model, loras, weights, samples, options: MergeOptions, steps=None, *,
                 regmean: bool = False, check=None):
        self.model = model
        self.loras = list(loras)
        self.weights = [float(w) for w in weights]
        self.samples = samples
        self.opts = options
        self.regmean = regmean
        self.steps_counter = steps
        self.check = check or (lambda: None)
        self.names = sorted(set().union(*[set(l.modules) for l in self.loras]))
        self.gdev = torch.device(options.gram_device) if options.gram_device else _gram_device(model)
        self.factors = [lora_factors(l, self.gdev) for l in self.loras]
        self.alpha1 = 0.0 if regmean else options.alpha1
        self.alpha2 = 0.0 if regmean else options.alpha2
        self.adaptive = options.adaptive_lambda and not regmean
        self.skip_untouched = options.untouched == "skip"
        self.need_unet = any(n.startswith("unet.") and not is_context_only(n) for n in self.names)
        self.fallbacks: set[str] = set()
        self.weighted_sum: set[str] = set()
        self.curve: list[dict] = []
        self.module_objective: dict[str, float] = {}
        self.module_target: dict[str, float] = {}

    # -- statistics passes ----------------------------------------------------------------------
    def _setup(self):
        self.hooks = DeltaHooks(self.model, self.names)
        for i, f in enumerate(self.factors):
            self.hooks.add(f"lora{i}", f)
        self.stats = GramStats(self.model, self.names, device=self.gdev, max_dim=self.opts.max_gram_dim,
                               reg_coef=0.0 if self.regmean else self.opts.reg_coef)
        ctx_only = [n for n in self.names if is_context_only(n)]
        self.protocol = SamplingProtocol(self.model, self.hooks, self.stats, steps=self.opts.steps,
                                 latent_size=self.opts.latent_size or (
                                     max(1, self.opts.resolution // 8) if self.opts.resolution else None), batch_size=self.opts.batch_size,
                                 need_unet=self.need_unet, context_modules=ctx_only, check=self.check)

    def _teardown(self):
        self.hooks.remove()
        self.stats.remove()

    def _pass(self, i, merged: bool, label: str):
        self.stats.reset()
        phases = [(f"lora{i}", "x"), ("merged", "pair")] if merged else [(f"lora{i}", "gram")]
        self.protocol.run(self.samples[i], phases)
        self.stats.check_paired()
        if self.steps_counter is not None:
            self.steps_counter.step(label)

    # -- per-module algebra ---------------------------------------------------------------------
    def _base_weight(self, n):
        return self.model.weight(n).reshape(self.model.weight(n).shape[0], -1).to(self.gdev, torch.float64)

    def _lambda(self, i, n, G):
        """λ_i = ‖W0+ΔW_i‖² / ‖X_i (W0+ΔW_i)ᵀ‖²; the denominator (= tr(W G Wᵀ)) was streamed from the
        outputs of "base + LoRA i" (context-only modules fed without a pass use G)."""
        if not self.adaptive:
            return 1.0
        W = self._base_weight(n)
        f = self.factors[i].get(n)
        if f is not None:
            W = W + f[0] @ f[1]
        den = self.stats.energy.get(n)
        if den is None:
            den = _tr_prod(W @ G, W.t())
        num = float((W * W).sum())
        if den <= 0 or num <= 0:
            return 1.0
        return num / den

    def _accumulate(self, i, iteration: int, num: dict, den: dict, merged: dict | None, obj: dict):
        """Fold LoRA i's fresh statistics into the numerators/denominators (and the objective)."""
        m_i = self.weights[i]
        for n in self.stats.tracked:
            acc = self.stats.acc_for(n)
            if not acc:
                continue
            if self.skip_untouched and n not in self.factors[i]:
                continue
            if iteration == 0:
                G = acc["G"]
                self.lam[i][n] = self._lambda(i, n, G)
                C = H = G
            else:
                C, H = acc["C"], acc["H"]
            lam = self.lam[i][n]
            f = self.factors[i].get(n)
            if iteration == 0 and f is not None:
                up, down = f
                self.target[i][n] = _tr_prod(up.t() @ up, down @ G @ down.t())
            w = lam * m_i
            if merged is not None and n in merged:      # objective of the merge that produced X̃
                U, V = merged[n]
                val = _tr_prod(U.t() @ U, V @ H @ V.t())
                if f is not None:
                    up, down = f
                    val += self.target[i][n] - 2.0 * _tr_prod((down @ C) @ V.t(), U.t() @ up)
                obj[n] = obj.get(n, 0.0) + w * val
            if f is not None:     # down_i (C + α₁‖C‖I), without forming the ridged copy
                D = f[1] @ C
                if self.alpha1:
                    D.add_(f[1], alpha=self.alpha1 * float(torch.linalg.matrix_norm(C)))
                num.setdefault(n, {})[i] = D
            if n in den:
                den[n].add_(H, alpha=w)
            else:
                den[n] = H * w
            if self.alpha2:
                den[n].diagonal().add_(w * self.alpha2 * float(torch.linalg.matrix_norm(H)))
            del acc
        self.stats.reset()

    def _solve(self, num, den) -> dict:
        out = {}
        self.weighted_sum = set()
        for n in self.names:
            ups, downs = [], []
            if n in den:
                M = den[n]
                idx = [i for i in range(len(self.loras)) if n in self.factors[i]]
                D = torch.cat([num[n][i] for i in idx], 0)            # (Σr) × d
                X, fell = _solve_sym(M, D.t())
                if fell:
                    self.fallbacks.add(n)
                down_all = X.t()
                row = 0
                for i in idx:
                    r = self.factors[i][n][0].shape[1]
                    ups.append(self.lam[i][n] * self.weights[i] * self.factors[i][n][0])
                    downs.append(down_all[row:row + r])
                    row += r
            else:   # no statistics (input too wide, or never reached): weighted sum (reported)
                self.weighted_sum.add(n)
                for i, f in enumerate(self.factors):
                    if n in f:
                        ups.append(self.weights[i] * f[n][0])
                        downs.append(f[n][1])
            out[n] = (torch.cat(ups, 1), torch.cat(downs, 0))
        return out

    @staticmethod
    def _change(new: dict, old: dict) -> float:
        diff2 = norm2 = 0.0
        for n, (U, V) in new.items():
            gu, gv = U.t() @ U, V @ V.t()
            norm2 += _tr_prod(gu, gv)
            if n in old:
                U2, V2 = old[n]
                W = torch.cat([U, -U2], 1)
                Z = torch.cat([V, V2], 0)
                diff2 += _tr_prod(W.t() @ W, Z @ Z.t())
            else:
                diff2 += _tr_prod(gu, gv)
        return (max(diff2, 0.0) ** 0.5) / max(norm2 ** 0.5, 1e-300)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> Edit:
        t0 = time.time()
        k = len(self.loras)
        self.lam = [dict() for _ in range(k)]
        self.target = [dict() for _ in range(k)]
        self._setup()
        try:
            num, den = {}, {}
            for i in range(k):
                self._pass(i, False, f"iteration 0: LoRA {i + 1}/{k}")
                self._accumulate(i, 0, num, den, None, {})
            cur = self._solve(num, den)
            self.curve.append({"iteration": 0, "change": None, "objective": None})
            iters = 0 if self.regmean else int(self.opts.iterations)
            converged = False
            t = 0
            while True:
                last = t >= iters or converged
                if last and not self.opts.evaluate_final:
                    break
                self.hooks.add("merged", cur)
                num, den, obj = {}, {}, {}
                for i in range(k):
                    label = f"final objective: LoRA {i + 1}/{k}" if last else f"iteration {t + 1}: LoRA {i + 1}/{k}"
                    self._pass(i, True, label)
                    self._accumulate(i, 1, num, den, cur, obj)
                self.curve[-1]["objective"] = sum(obj.values())
                self.module_objective = obj
                if last:
                    break
                new = self._solve(num, den)
                t += 1
                change = self._change(new, cur)
                self.curve.append({"iteration": t, "change": change, "objective": None})
                cur = new
                converged = change < self.opts.tol
        finally:
            self._teardown()
        sc = self.steps_counter
        if sc is not None and sc.done < sc.total:      # stopped early: finish the bar
            sc.step("converged", n=sc.total - sc.done)
        return self._edit(cur, time.time() - t0, converged if not self.regmean else None)

    def evaluate(self, factors: dict) -> tuple[float, dict]:
        """The objective ``J`` of any merge given as factors ``{module: (U, V)}`` (``U @ V = ΔW``, 2-D)
        on this solver's samples: λ from a plain pass of every LoRA, then one paired pass."""
        k = len(self.loras)
        self.lam = [dict() for _ in range(k)]
        self.target = [dict() for _ in range(k)]
        fac = {n: (U.to(self.gdev, torch.float64), V.reshape(V.shape[0], -1).to(self.gdev, torch.float64))
               for n, (U, V) in factors.items()}
        obj: dict = {}
        self._setup()
        try:
            for i in range(k):
                self._pass(i, False, f"objective: λ of LoRA {i + 1}/{k}")
                self._accumulate(i, 0, {}, {}, None, {})
            self.hooks.add("merged", fac)
            for i in range(k):
                self._pass(i, True, f"objective: LoRA {i + 1}/{k}")
                self._accumulate(i, 1, {}, {}, fac, obj)
        finally:
            self._teardown()
        return sum(obj.values()), obj

    def _edit(self, factors, elapsed, converged) -> Edit:
        deltas, facs = {}, {}
        for n, (U, V) in factors.items():
            shape = self.loras[next(i for i in range(len(self.loras)) if n in self.loras[i].modules)].modules[n].shape
            deltas[n] = (U @ V).reshape(shape).float().cpu()
            facs[n] = (U.float().cpu().contiguous(), V.float().cpu().contiguous())
        targets = {}
        for i in range(len(self.loras)):
            for n, e in self.target[i].items():
                targets[n] = targets.get(n, 0.0) + self.lam[i].get(n, 1.0) * self.weights[i] * e
        residuals = {n: ((self.module_objective[n] / targets[n]) ** 0.5 if targets.get(n) else None)
                     for n in self.module_objective}
        report = {
            "iterations": max(0, len(self.curve) - 1),
            "converged": converged,
            "curve": self.curve,
            "residuals": residuals,
            "lambdas": {n: [self.lam[i].get(n) for i in range(len(self.loras))] for n in self.names},
            "fallback_weighted_sum": sorted(self.weighted_sum),
            "fallback_least_squares": sorted(self.fallbacks),
            "unet_passes": self.protocol.unet_passes,
            "text_encoder_passes": self.protocol.te_passes,
            "peak_feature_batch_bytes": self.stats.peak_queue_bytes,
            "solve_time_s": elapsed,
        }
        return Edit(self.model.family, dict(self.model.unet_config), deltas, facs, report)
