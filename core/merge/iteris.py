"""IterIS: iterative inference-solving LoRA merging (docs/method.md, "LoRA merging").

For every module touched by any input LoRA, with ``ΔW_i = s_i·up_i·down_i`` (``s_i = alpha/r``)::

    ΔW* = ( Σ_i λ_i m_i ΔW_i (C_i + α₁‖C_i‖I) ) ( Σ_i λ_i m_i (H_i + α₂‖H_i‖I) )⁻¹

(the paper's per-LoRA ridge, ``ridge_toward="mean"``; the default ``"sum"`` replaces both ridge terms by one
``β = α₂ Σ_i λ_i m_i ‖H_i‖`` per module pulling toward ``Σ_i m_i ΔW_i``, docs/method.md "IterIS ridge
target"), with ``C_i = X_iᵀX̃_i`` and ``H_i = X̃_iᵀX̃_i`` streamed through hooks (:mod:`.stats`), ``X_i`` the
module's inputs under "base + LoRA i" and ``X̃_i`` under "base + current merge" on LoRA i's samples
(:mod:`.sampling`). Iteration 0 uses ``X̃_i = X_i`` (``C = H = G``). Jacobi schedule (default): one
paired pass over all samples refreshes every module's statistics, then every module is solved
("IterIS loop and convergence"). Sequential schedule (``MergeOptions.schedule``, docs/merge.md,
"Schedule"): the iterations take the depth stages of :func:`.memory_plan.depth_stage` shallow to deep, each stage
with its own paired passes under the merge in which the shallower stages are already this
iteration's solution (Gauss–Seidel); iteration 0 and the final objective pass are the same as Jacobi's.
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

from .. import memory
from ..edit import Edit, FactorDeltas
from ..precision import compute_dtype
from .memory_plan import Budget, Chunk, MemoryPlan, ModuleSize, PlanSettings, plan_memory, reserve_bytes
from .options import MergeOptions
from .sampling import SamplingProtocol, progress_units, stats_of
from .stats import DeltaHooks, GramStats, in_dim


def _gram_device(model):
    p = next(iter(model.text_encoders.values())).parameters().__next__()
    return torch.device("cpu") if p.device.type == "mps" else p.device


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


def factor_pair(m, device="cpu"):
    """(s·up, down) of one LoRA module as float64 2-D tensors on ``device``."""
    return (m.scale * m.up.double()).to(device), m.down.double().to(device)


def lora_factors(lora, device="cpu") -> dict:
    """module -> (s·up, down) as float64 2-D tensors."""
    return {n: factor_pair(m, device) for n, m in lora.modules.items()}


class StatisticsPasses:
    """What the statistics passes of one :meth:`IterISSolver.run` (or ``evaluate``) hold, in one object: the
    hooks (each LoRA's factors as ``lora{i}``, the merge's as ``merged``), the streamed statistics
    (:class:`.stats.GramStats` of the planned ``tracked`` modules), the sampling protocol that runs them, and
    the peak-memory probe. A context manager: on exit the hooks and statistics hooks are removed and the
    peak (RSS on the CPU, allocated memory on CUDA) goes into ``memory``; the pass counters stay readable."""

    def __init__(
        self,
        model,
        names,
        lora_hooks,
        tracked,
        device,
        memory_report: dict,
        *,
        reg_coef: float,
        c_norm: bool,
        max_gram_dim: int,
        max_rows: int,
        seed: int,
        steps: int,
        latent: int,
        batch_size: int,
        check,
    ):
        self.device = device
        self.memory = memory_report
        self.hooks = DeltaHooks(model, names)
        for label, pairs in lora_hooks:  # (label, (module, (up, down)) pairs), consumed one at a time
            self.hooks.add(label, pairs)
        self.stats = GramStats(
            model, tracked, device=device, max_dim=max_gram_dim, reg_coef=reg_coef, max_rows=max_rows, seed=seed
        )
        self.stats.c_norm = c_norm
        self.protocol = SamplingProtocol(
            model,
            self.hooks,
            self.stats,
            steps=steps,
            latent_size=latent,
            batch_size=batch_size,
            need_unet=True,
            context_modules=[],
            check=check,
        )
        self.peak = memory.PeakRSS(interval=0.05) if device.type == "cpu" else None

    def __enter__(self):
        if self.peak is not None:
            self.peak.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.remove()
        self.stats.remove()
        if self.peak is not None:
            self.peak.__exit__(None, None, None)
            self.memory["peak_rss_bytes"] = self.peak.peak
        elif self.device.type == "cuda":
            self.memory["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return False


class IterISSolver:
    """The IterIS loop on one model. ``loras``: mapped :class:`~weightsmith.core.lora_read.LoRA` objects;
    ``weights``: m_i; ``samples``: per-LoRA lists of :class:`~.sampling.Sample`.

    Memory (docs/merge.md, "Memory"): the LoRAs' factors are converted to float64 one module at a
    time, never kept; the merge is kept as its ``down`` factors only (``up`` is the LoRAs' scaled
    ``up``s, rebuilt when needed); and the modules are planned into chunks whose statistics fit the
    budget ``options.max_memory_gb``: each chunk gets its own passes over the samples (Jacobi: every
    chunk of an iteration sees the same merge), so the result does not depend on the chunking."""

    def __init__(
        self, model, loras, weights, samples, options: MergeOptions, steps=None, *, regmean: bool = False, check=None
    ):
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
        self.touch = [set(l.modules) for l in self.loras]
        self.alpha1 = 0.0 if regmean else options.alpha1
        self.alpha2 = 0.0 if regmean else options.alpha2
        self.adaptive = options.adaptive_lambda and not regmean
        self.skip_untouched = options.untouched == "skip"
        # ridge toward the sum: one ridge β = α₂·Σ λ_i m_i ‖H_i‖ per module, added at solve time
        self.to_sum = options.ridge_toward == "sum" and not regmean and self.alpha2 > 0
        if self.to_sum:  # α₁ has no role there: no ‖C_i‖, so no float32 C_i is kept (memory, time)
            self.alpha1 = 0.0
        self.ridge_mass: dict[str, float] = {}
        self.fallbacks: set[str] = set()
        self.weighted_sum: set[str] = set()
        self.fallback_reasons: dict[str, str] = {}
        self.curve: list[dict] = []
        self.module_objective: dict[str, float] = {}
        self.module_target: dict[str, float] = {}
        self.lam = [dict() for _ in self.loras]
        self._given_U = None  # evaluate(): the ups of the factors being evaluated
        self.n_passes = 0
        wdt = model.module(self.names[0]).weight.dtype if self.names else torch.float32
        # the merge's factors are stored at the model's precision, at least float32 (a float64 model
        # keeps everything float64; hooks use the model's dtype anyway)
        self.store_dtype = torch.float64 if wdt == torch.float64 else torch.float32
        # latent side of the samples: options, else resolution / 8, else the UNet's sample_size
        self.latent = options.latent_size or (
            max(1, options.resolution // 8) if options.resolution else int(model.unet_config.get("sample_size", 64))
        )
        self.target = [dict() for _ in self.loras]  # per LoRA and module: ‖X_i ΔW_iᵀ‖² (iteration 0)
        self.passes: StatisticsPasses | None = None  # hooks, statistics, peak of the current (last) run
        # the sequential schedule's iterations take the plan's chunks cut at the depth stages
        self.sequential = options.schedule == "sequential" and not regmean and options.iterations > 0
        self.memory_plan = self._plan()
        self.plan = list(self.memory_plan.chunks)
        self.stage_plan = list(self.memory_plan.stage_chunks)
        self.group_bytes = self.memory_plan.group_bytes
        self.fallback_reasons.update(self.memory_plan.fallback_reasons)
        self.memory = dict(self.memory_plan.memory)

    # -- factors, on demand ----------------------------------------------------------------------
    def _fac(self, i, n):
        """(s·up, down) of LoRA i at module n, float64 2-D on the statistics device (None if untouched)."""
        m = self.loras[i].modules.get(n)
        return None if m is None else factor_pair(m, self.gdev)

    def _idx(self, n):
        return [i for i in range(len(self.loras)) if n in self.touch[i]]

    def _U(self, n, weighted_sum: bool):
        """The merge's ``up`` at module n: ``[λ_i m_i s_i up_i | …]`` (``m_i s_i up_i`` for the weighted sum)."""
        if self._given_U is not None:
            return self._given_U[n]
        ups = []
        for i in self._idx(n):
            m = self.loras[i].modules[n]
            c = self.weights[i] * (1.0 if weighted_sum else self.lam[i][n])
            ups.append(c * m.scale * m.up.double().to(self.gdev))
        return torch.cat(ups, 1)

    def _merged(self, state):
        """(module, (U, V)) pairs of a merge state ``(V by module, weighted-sum modules)``, one at a time."""
        downs, ws = state
        for n, V in downs.items():
            yield n, (self._U(n, n in ws), V.to(self.gdev, torch.float64))

    # -- memory plan ------------------------------------------------------------------------------
    def _plan(self) -> MemoryPlan:
        """The memory plan (:func:`.memory_plan.plan_memory`) of this solver's modules, LoRAs and budget."""
        o = self.opts
        later = not self.regmean and (o.iterations > 0 or o.evaluate_final)
        store = 8 if self.store_dtype == torch.float64 else 4
        settings = PlanSettings(
            batch=max(1, int(o.batch_size)),
            latent=self.latent,
            levels=len(self.model.unet_config.get("block_out_channels", (1,))),
            max_rows=o.max_rows,
            max_gram_dim=o.max_gram_dim,
            c_norm=later and self.alpha1 > 0,
            act_bytes=store,
            store_bytes=store,
            hook_bytes=compute_dtype(self.model.module(self.names[0]).weight.dtype).itemsize if self.names else 4,
            tokens=getattr(self.model, "plan_tokens", 77),  # text tokens per prompt (Flux: T5's 256)
            sequential=self.sequential,
            denoiser=stats_of(self.model),
        )
        weights = {n: self.model.module(n).weight for n in self.names}  # shapes only (a streamed one is on meta)
        modules = [
            ModuleSize(
                n,
                in_dim(self.model.module(n)),
                weights[n].shape[0],
                weights[n][0].numel(),
                tuple(self.loras[i].modules[n].rank for i in self._idx(n)),
            )
            for n in self.names
        ]
        # plus what a model that reads its weights as it runs holds for one call (Flux: one block in float32)
        reserve = reserve_bytes(modules, settings) + int(getattr(self.model, "transient_bytes", 0))
        budget, used, avail = self._statistics_budget(reserve)
        raise_to_free = not o.max_memory_gb and self.gdev.type == "cpu" and avail is not None
        free = memory.free_budget(self.gdev) if raise_to_free else None
        return plan_memory(modules, settings, Budget(budget, used, avail, free, raise_to_free), reserve)

    def _statistics_budget(self, reserve: int):
        """(budget, in use now, left for statistics) in bytes, where the statistics live."""
        o = self.opts
        self._release(collect=True)  # "in use" is what is held, not the heap's free pages
        budget = int(o.max_memory_gb * memory.GIB) if o.max_memory_gb else memory.default_budget(self.gdev)
        used = memory.used_bytes(self.gdev)
        return budget, used, (None if budget is None else budget - used - reserve)

    def planned_passes(self) -> int:
        """How many passes :meth:`run` makes (every LoRA × layer group × round) unless it converges early."""
        return sum(len(units) * r for units, r in self._rounds())

    def cost_blocks(self) -> list:
        """The relative cost of each progress tick of :meth:`run`, as ``(costs of one round's ticks, rounds)``
        blocks in order (iteration 0, the iterations, the final objective): a text-encoder batch ≈ 1/20 of a
        UNet step (one model; paired passes run two), so the time left is known after the first step.
        Held once per kind of round, whatever the iteration count (:class:`..progress.Steps` takes them)."""
        return [([c for u in units for c in u], r) for units, r in self._rounds() if r]

    def unit_costs(self) -> list:
        """:meth:`cost_blocks` written out, one cost per tick (as long as the run: front ends use the blocks)."""
        return [c for block, r in self.cost_blocks() for _ in range(r) for c in block]

    def _rounds(self) -> list:
        """(per pass of one round, the cost of each of its ticks; how many such rounds)."""
        iters = 0 if self.regmean else int(self.opts.iterations)
        return [
            (self._round_units(1, self.plan), 1),
            (self._round_units(2, self.stage_plan), iters),
            (self._round_units(2, self.plan), int(bool(self.opts.evaluate_final))),
        ]

    def _round_units(self, m: float, plan) -> list:
        """Per pass of one round over ``plan`` (every chunk, every LoRA), the cost of each of its ticks (a UNet
        step of iteration 0 = 1; ``m``: models run per step)."""
        out = []
        for c in plan:
            for i in range(len(self.loras)):
                n_text, n_unet = progress_units(self.samples[i], self.opts.batch_size, self.opts.steps, c.need_unet)
                out.append([0.05 * m] * n_text + [1.0 * m] * n_unet)
        return out

    # -- statistics passes ----------------------------------------------------------------------
    def _open_passes(self) -> StatisticsPasses:
        """New statistics passes (hooks of every LoRA, statistics of the planned modules), kept as
        :attr:`passes` for the report; use as a context manager."""
        o = self.opts
        self.passes = StatisticsPasses(
            self.model,
            self.names,
            (
                (f"lora{i}", ((n, self._fac(i, n)) for n in sorted(self.touch[i]))) for i in range(len(self.loras))
            ),  # float64 one module at a time
            sorted(n for c in self.plan for n in c.names),
            self.gdev,
            self.memory,
            reg_coef=0.0 if self.regmean else o.reg_coef,
            c_norm=self.alpha1 > 0,
            max_gram_dim=o.max_gram_dim,
            max_rows=o.max_rows,
            seed=o.seed,
            steps=o.steps,
            latent=self.latent,
            batch_size=o.batch_size,
            check=self.check,
        )
        return self.passes

    def _pass(self, i, merged: bool, label: str, chunk: Chunk, plan=None):
        stats, protocol = self.passes.stats, self.passes.protocol
        stats.reset()
        stats.set_active(chunk.names)
        stats.projections = {}
        if merged:  # D_n = down_n·C streamed for every module of LoRA i in the chunk
            for n in chunk.names:
                if n in self.touch[i]:
                    lead = stats.leader_of[n]
                    stats.projections.setdefault(lead, []).append((n, self._fac(i, n)[1]))
        protocol.need_unet = chunk.need_unet
        protocol.context_modules = chunk.context
        phases = [(f"lora{i}", "x"), ("merged", "pair")] if merged else [(f"lora{i}", "gram")]
        sc = self.steps_counter
        if sc is not None:
            plan = self.plan if plan is None else plan
            if len(plan) > 1:
                label += f", layer group {plan.index(chunk) + 1}/{len(plan)}"
            n_text, n_unet = protocol.units(self.samples[i])
            seen = {"text": 0, "unet": 0}

            def tick(kind):
                seen[kind] += 1
                sc.step(
                    f"{label}, text {seen[kind]}/{n_text}" if kind == "text" else f"{label}, step {seen[kind]}/{n_unet}"
                )

            protocol.tick = tick
        try:
            protocol.run(self.samples[i], phases)
        finally:
            protocol.tick = None
        stats.check_paired()
        stats.projections = {}
        self.n_passes += 1

    def _release(self, collect: bool = False):
        """Before planning and between passes: the C heap's free pages back to the OS, so the process
        holds what the plan counts (docs/merge.md, "Memory"); statistics on a GPU: nothing to do."""
        if self.gdev.type == "cpu":
            memory.release_free_heap(collect=collect)

    # -- per-module algebra ---------------------------------------------------------------------
    def _base_weight(self, n):
        return self.model.weight(n).reshape(self.model.weight(n).shape[0], -1).to(self.gdev, torch.float64)

    def _lambda(self, i, n, G):
        """λ_i = ‖W0+ΔW_i‖² / ‖X_i (W0+ΔW_i)ᵀ‖²; the denominator (= tr(W G Wᵀ)) was streamed from the
        outputs of "base + LoRA i" (context-only modules fed without a pass use G)."""
        if not self.adaptive:
            return 1.0
        W = self._base_weight(n)
        f = self._fac(i, n)
        if f is not None:
            W = W + f[0] @ f[1]
        den = self.passes.stats.energy.get(n)
        if den is None:
            den = _tr_prod(W @ G, W.t())
        num = float((W * W).sum())
        if den <= 0 or num <= 0:
            return 1.0
        return num / den

    def _accumulate(self, i, iteration: int, chunk: Chunk, num: dict, den: dict, merged, obj: dict):
        """Fold LoRA i's fresh statistics into the numerators/denominators (and the objective)."""
        m_i = self.weights[i]
        for n in chunk.names:
            acc = self.passes.stats.acc_for(n)
            if not acc:
                continue
            if self.skip_untouched and n not in self.touch[i]:
                continue
            f = self._fac(i, n)
            if iteration == 0:
                G = acc["G"]
                self.lam[i][n] = self._lambda(i, n, G)
                H = G
                D = None if f is None else f[1] @ G
                c_norm = None
            else:
                H = acc["H"]
                D = None if f is None else acc[("D", n)]
                c_norm = (
                    float(torch.linalg.vector_norm(acc["C32"], dtype=torch.float64))
                    if self.alpha1 and f is not None
                    else None
                )
            lam = self.lam[i][n]
            if iteration == 0 and f is not None:
                up, down = f
                self.target[i][n] = _tr_prod(up.t() @ up, D @ down.t())
            w = lam * m_i
            if merged is not None and n in merged[0]:  # objective of the merge that produced X̃
                U = self._U(n, n in merged[1])
                V = merged[0][n].to(self.gdev, torch.float64)
                val = _tr_prod(U.t() @ U, V @ H @ V.t())
                if f is not None:
                    up, _ = f
                    val += self.target[i][n] - 2.0 * _tr_prod(D @ V.t(), U.t() @ up)
                obj[n] = obj.get(n, 0.0) + w * val
            if f is not None:  # down_i (C + α₁‖C‖I), without forming the ridged copy
                if self.alpha1:
                    c = float(torch.linalg.matrix_norm(G)) if iteration == 0 else c_norm
                    D = D + (self.alpha1 * c) * f[1]
                num.setdefault(n, {})[i] = D
            if n in den:
                den[n].add_(H, alpha=w)
            else:
                den[n] = H * w
            if self.to_sum:
                self.ridge_mass[n] = self.ridge_mass.get(n, 0.0) + w * self.alpha2 * float(torch.linalg.matrix_norm(H))
            elif self.alpha2:
                den[n].diagonal().add_(w * self.alpha2 * float(torch.linalg.matrix_norm(H)))
            del acc
        self.passes.stats.reset()

    def _solve(self, num, den, names, state) -> None:
        """Solve ``names`` into ``state = (downs, weighted-sum set)``."""
        downs, ws = state
        for n in names:
            if n in den and self.to_sum:
                # ΔW (Σ λ_i m_i H_i + βI) = Σ m_i ΔW_i (λ_i C_i + βI): with up_i carrying λ_i m_i, down_i gets β/λ_i
                beta = self.ridge_mass.pop(n, 0.0)
                den[n].diagonal().add_(beta)
                for i in self._idx(n):
                    if i in num.get(n, {}):
                        num[n][i] = num[n][i] + (beta / self.lam[i][n]) * self._fac(i, n)[1]
            if n in den:
                X, fell = _solve_sym(den.pop(n), torch.cat([num[n][i] for i in self._idx(n)], 0).t())
                num.pop(n, None)
                if fell:
                    self.fallbacks.add(n)
                downs[n] = X.t().to(self.store_dtype).contiguous()
            else:  # no statistics (input too wide, over the memory budget, never reached): weighted sum
                if n not in self.fallback_reasons:
                    self.fallback_reasons[n] = "no layer inputs reached it in the samples"
                ws.add(n)
                downs[n] = torch.cat([self.loras[i].modules[n].down.double() for i in self._idx(n)], 0).to(
                    self.gdev, self.store_dtype
                )

    def _change(self, new, old) -> float:
        diff2 = norm2 = 0.0
        for n in new[0]:
            U, V = self._U(n, n in new[1]), new[0][n].to(self.gdev, torch.float64)
            gu, gv = U.t() @ U, V @ V.t()
            norm2 += _tr_prod(gu, gv)
            if n in old[0]:
                U2, V2 = self._U(n, n in old[1]), old[0][n].to(self.gdev, torch.float64)
                W = torch.cat([U, -U2], 1)
                Z = torch.cat([V, V2], 0)
                diff2 += _tr_prod(W.t() @ W, Z @ Z.t())
            else:
                diff2 += _tr_prod(gu, gv)
        return (max(diff2, 0.0) ** 0.5) / max(norm2**0.5, 1e-300)

    def _sweep(self, iteration: int, merged, label: str, solve: bool, obj: dict):
        """One round of passes: every chunk, every LoRA (paired with ``merged`` when given); returns the
        next merge state when ``solve``. Sequential schedule: the chunks are the depth stages, and each
        stage's solution replaces the previous merge in the hooks before the deeper stages' passes."""
        k = len(self.loras)
        state = ({}, set())
        sequential = solve and merged is not None and self.sequential
        plan = self.stage_plan if sequential else self.plan
        for chunk in plan:
            num, den = {}, {}
            for i in range(k):
                self._pass(i, merged is not None, label.format(i=i + 1, k=k), chunk, plan)
                self._accumulate(i, iteration, chunk, num, den, merged, obj)
                self._release()
            if solve:
                self._solve(num, den, chunk.names, state)
                if sequential:
                    self.passes.hooks.add(
                        "merged",
                        (
                            (n, (self._U(n, n in state[1]), state[0][n].to(self.gdev, torch.float64)))
                            for n in chunk.names
                        ),
                        update=True,
                    )
            del num, den
            self._release()
        if solve:
            planned = {n for c in self.plan for n in c.names}
            self._solve({}, {}, [n for n in self.names if n not in planned], state)
            state = ({n: state[0][n] for n in self.names}, state[1])
        return state

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> Edit:
        t0 = time.time()
        k = len(self.loras)
        self.lam = [dict() for _ in range(k)]
        self.target = [dict() for _ in range(k)]
        with self._open_passes() as passes:
            cur = self._sweep(0, None, "iteration 0: LoRA {i}/{k}", True, {})
            self.curve.append({"iteration": 0, "change": None, "objective": None})
            iters = 0 if self.regmean else int(self.opts.iterations)
            converged = False
            t = 0
            while True:
                last = t >= iters or converged
                if last and not self.opts.evaluate_final:
                    break
                passes.hooks.add("merged", self._merged(cur))
                obj = {}
                label = "final objective: LoRA {i}/{k}" if last else f"iteration {t + 1}: LoRA {{i}}/{{k}}"
                new = self._sweep(1, cur, label, not last, obj)
                self.curve[-1]["objective"] = sum(obj.values())
                self.module_objective = obj
                if last:
                    break
                t += 1
                change = self._change(new, cur)
                self.curve.append({"iteration": t, "change": change, "objective": None})
                cur = new
                converged = change < self.opts.tol
        sc = self.steps_counter
        if sc is not None and sc.done < sc.total:  # stopped early: finish the bar
            sc.step("converged", n=sc.total - sc.done)
        return self._edit(cur, time.time() - t0, converged if not self.regmean else None)

    def evaluate(self, factors: dict) -> tuple[float, dict]:
        """The objective ``J`` of any merge given as factors ``{module: (U, V)}`` (``U @ V = ΔW``, 2-D)
        on this solver's samples: λ from a plain pass of every LoRA, then one paired pass."""
        k = len(self.loras)
        self.lam = [dict() for _ in range(k)]
        self.target = [dict() for _ in range(k)]
        fac = {
            n: (U.to(self.gdev, torch.float64), V.reshape(V.shape[0], -1).to(self.gdev, torch.float64))
            for n, (U, V) in factors.items()
        }
        obj: dict = {}
        with self._open_passes() as passes:
            self._sweep(0, None, "objective: λ of LoRA {i}/{k}", False, {})
            passes.hooks.add("merged", fac)
            self._given_U = {n: U for n, (U, V) in fac.items()}
            try:
                self._sweep(1, ({n: V for n, (U, V) in fac.items()}, set()), "objective: LoRA {i}/{k}", False, obj)
            finally:
                self._given_U = None
        return sum(obj.values()), obj

    def _edit(self, state, elapsed, converged) -> Edit:
        facs, shapes = {}, {}
        for n, (U, V) in self._merged(state):
            shapes[n] = self.loras[self._idx(n)[0]].modules[n].shape
            facs[n] = (U.float().cpu().contiguous(), V.float().cpu().contiguous())
        deltas = FactorDeltas(facs, shapes)  # dense ΔW formed when read (docs/merge.md, "Memory")
        targets = {}
        for i in range(len(self.loras)):
            for n, e in self.target[i].items():
                targets[n] = targets.get(n, 0.0) + self.lam[i].get(n, 1.0) * self.weights[i] * e
        residuals = {
            n: ((self.module_objective[n] / targets[n]) ** 0.5 if targets.get(n) else None)
            for n in self.module_objective
        }
        self.weighted_sum = set(state[1])
        self.memory["passes"] = self.n_passes
        report = {
            "iterations": max(0, len(self.curve) - 1),
            "converged": converged,
            "schedule": "sequential" if self.sequential else "jacobi",
            "curve": self.curve,
            "residuals": residuals,
            "lambdas": {n: [self.lam[i].get(n) for i in range(len(self.loras))] for n in self.names},
            "fallback_weighted_sum": sorted(self.weighted_sum),
            "fallback_reasons": {n: self.fallback_reasons.get(n, "") for n in sorted(self.weighted_sum)},
            "fallback_least_squares": sorted(self.fallbacks),
            "unet_passes": self.passes.protocol.unet_passes,
            "text_encoder_passes": self.passes.protocol.te_passes,
            "peak_feature_batch_bytes": self.passes.stats.peak_queue_bytes,
            "memory": dict(self.memory),
            "solve_time_s": elapsed,
        }
        return Edit(self.model.family, dict(self.model.unet_config), deltas, facs, report)
