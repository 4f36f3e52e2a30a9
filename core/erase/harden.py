"""Hardening rounds: the closed-form adversarial input of an edited stage, and how close it gets.

docs/method.md, "Hardening rounds". A *stage* is a set of matrices that read the same input (the
UNet cross-attention ``to_k``/``to_v`` of every block; one sub-layer group of one text-encoder layer).
For target inputs ``X_t`` (columns) the adversarial inputs are

    X* = argmin_X  Σ_W ‖W_e X − W_o X_t‖_F² + λ ‖X‖_F²  =  (Σ W_eᵀW_e + λI)⁻¹ Σ W_eᵀW_o X_t

(RECE's ``close_regzero`` reading, regularised toward 0), with ``λ = reg · tr(Σ W_eᵀW_e) / d_in``:
``reg`` is relative to the mean eigenvalue of the stage's Gram matrix, so one value fits every stage
and model size. Everything runs in float64; the stage enters only through the three ``d_in × d_in``
Gram sums of :class:`StageGrams`, so no feature-by-output product is formed.

Public: :func:`adversarial_inputs` (weights in, inputs out; the closed-form attack), :class:`StageGrams`,
:func:`adversarial_inputs_from_grams`, :func:`measure` (one report row) and :func:`summarize`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

F64 = torch.float64

DEFAULT_REG = 0.01  # docs/method.md, "Hardening rounds": measured plausibility of the derived inputs


class StageGrams:
    """``A = Σ W_eᵀW_e``, ``B = Σ W_eᵀW_o``, ``C = Σ W_oᵀW_o`` over a stage's matrices (float64),
    ``W_e = W_o + Δ``. Add each matrix once with :meth:`add`.

    Kept as ``C``, ``E = Σ ΔᵀW_o`` and ``F = Σ ΔᵀΔ`` (``A = C + E + Eᵀ + F``, ``B = C + E``). With the
    edit's factors ``Δ = up @ down`` of rank ``r`` the two edit terms cost ``O(r·d_in·(d_out + d_in))``
    instead of ``O(d_out·d_in²)``; ``C`` does not depend on the edit, so a stage's later rounds pass the
    first round's (``C=``) and skip it."""

    def __init__(self, d_in: int, C: torch.Tensor | None = None, device=None):
        device = C.device if C is not None else device
        z = lambda: torch.zeros(d_in, d_in, dtype=F64, device=device)  # noqa: E731
        self._own_C = C is None
        self.C = z() if C is None else C
        self.E, self.F = z(), z()
        self.matrices = 0

    def add(
        self,
        W_o: torch.Tensor,
        delta: torch.Tensor | None = None,
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        W_o = W_o.to(F64)
        if self._own_C:
            self.C += W_o.T @ W_o
        if factors is not None and factors[0].shape[1] < min(W_o.shape):
            up, down = factors[0].to(F64), factors[1].to(F64)
            self.E += down.T @ (up.T @ W_o)
            self.F += down.T @ ((up.T @ up) @ down)
        elif delta is not None:
            D = delta.to(F64)
            self.E += D.T @ W_o
            self.F += D.T @ D
        self.matrices += 1

    @property
    def A(self) -> torch.Tensor:
        return self.C + self.E + self.E.T + self.F

    @property
    def B(self) -> torch.Tensor:
        return self.C + self.E

    @property
    def DtD(self) -> torch.Tensor:
        """``Σ ΔᵀΔ``."""
        return self.F

    @classmethod
    def of(cls, W_edit: Sequence[torch.Tensor], W_orig: Sequence[torch.Tensor]) -> StageGrams:
        if len(W_edit) != len(W_orig) or not W_edit:
            raise ValueError(f"need as many edited as original matrices (got {len(W_edit)} and {len(W_orig)}), >= 1")
        g = cls(int(W_orig[0].shape[1]), device=W_orig[0].device)
        for We, Wo in zip(W_edit, W_orig):
            if We.shape != Wo.shape:
                raise ValueError(f"edited and original matrix shapes differ: {tuple(We.shape)} vs {tuple(Wo.shape)}")
            g.add(Wo, We.to(F64) - Wo.to(F64))
        return g


def ridge_lambda(A: torch.Tensor, reg: float) -> float:
    """``λ = reg · tr(A) / d_in`` (``reg`` relative to the mean eigenvalue of ``A``)."""
    return float(reg) * float(torch.trace(A)) / A.shape[0]


def adversarial_inputs_from_grams(
    A: torch.Tensor, B: torch.Tensor, targets_X: torch.Tensor, reg: float
) -> torch.Tensor:
    """``(A + λI)⁻¹ B X_t`` with ``λ = ridge_lambda(A, reg)`` (float64, ``d_in × N``)."""
    lam = ridge_lambda(A, reg)
    M = A + lam * torch.eye(A.shape[0], dtype=F64, device=A.device)
    return torch.linalg.solve(M, B @ targets_X.to(device=A.device, dtype=F64))


def adversarial_inputs(
    W_edit_list: Sequence[torch.Tensor],
    W_orig_list: Sequence[torch.Tensor],
    targets_X: torch.Tensor,
    reg: float = DEFAULT_REG,
) -> torch.Tensor:
    """The inputs ``X*`` (``d_in × N``, float64, one column per column of ``targets_X``) that the edited
    matrices ``W_edit_list`` map closest to what the original matrices ``W_orig_list`` make of the target
    inputs ``targets_X``, regularised toward 0:

        X* = argmin_X Σ_i ‖W_edit[i] X − W_orig[i] X_t‖_F² + λ‖X‖_F²,   λ = reg · tr(Σ W_eᵀW_e) / d_in

    All matrices must read the same input (``d_out_i × d_in``) and live on one device (the result's).
    docs/method.md, "Hardening rounds"."""
    g = StageGrams.of(W_edit_list, W_orig_list)
    return adversarial_inputs_from_grams(g.A, g.B, targets_X, reg)


def _quad(M: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """``tr(Uᵀ M V)``."""
    return float((U * (M @ V)).sum())


def measure(
    g: StageGrams,
    targets_X: torch.Tensor,
    anchors_Y: torch.Tensor,
    reg: float,
    preserve_P: torch.Tensor | None = None,
    X_adv: torch.Tensor | None = None,
) -> tuple[dict, torch.Tensor]:
    """One report row of a stage (docs/method.md, "Hardening rounds", report fields) and ``X*``.

    With ``d(W_e) = (Σ ‖W_e X* − W_o X_t‖²)^½`` at the adversarial inputs ``X*`` of ``W_e`` and the
    unedited gap ``g = (Σ ‖W_o (Y − X_t)‖²)^½``, the *recovery* ``1 − d/g`` is 1 when the adversary
    reaches the target's original output exactly and 0 when it gets no closer than the anchor's.
    ``adv_residual`` = recovery of the edited stage / recovery of the unedited stage (same ``reg``):
    1 = the edit stops nothing an adversary can reach in closed form, 0 = the adversary gets no closer
    to the target than the anchor is (lower is more robust)."""
    Xt, Y = targets_X.to(F64), anchors_Y.to(F64)
    A, B, dD = g.A, g.B, g.DtD
    if X_adv is None:
        X_adv = adversarial_inputs_from_grams(A, B, Xt, reg)
    X_adv = X_adv.to(F64)
    X0 = adversarial_inputs_from_grams(g.C, g.C, Xt, reg)  # the same adversary against the unedited stage
    tC = _quad(g.C, Xt, Xt)

    def dist(A, B, Xs):  # Σ‖W_e X* − W_o X_t‖² = tr(X*ᵀA X*) − 2 tr(X*ᵀB X_t) + tr(X_tᵀC X_t)
        return max(_quad(A, Xs, Xs) - 2 * _quad(B, Xs, Xt) + tC, 0.0) ** 0.5

    D = Y - Xt
    gap = max(_quad(g.C, D, D), 0.0) ** 0.5
    d_e = dist(A, B, X_adv)
    d_0 = dist(g.C, g.C, X0)
    rec_e = 1 - d_e / gap if gap > 0 else 0.0
    rec_0 = 1 - d_0 / gap if gap > 0 else 0.0
    wn = float(torch.trace(g.C)) ** 0.5
    row = {
        "adv_residual": rec_e / rec_0 if rec_0 > 0 else None,
        "adv_distance": d_e / gap if gap > 0 else 0.0,
        "adv_distance_unedited": d_0 / gap if gap > 0 else 0.0,
        "adv_input_norm": float(X_adv.norm() / Xt.norm()) if float(Xt.norm()) > 0 else 0.0,
        "delta_rel": max(float(torch.trace(dD)), 0.0) ** 0.5 / wn if wn > 0 else 0.0,
        "preserve_residual": None,
        "lam": ridge_lambda(A, reg),
        "matrices": g.matrices,
        "targets": int(Xt.shape[1]),
    }
    if preserve_P is not None and preserve_P.numel():
        P = preserve_P.to(F64)
        base = _quad(g.C, P, P)
        row["preserve_residual"] = max(_quad(dD, P, P), 0.0) ** 0.5 / base**0.5 if base > 0 else 0.0
    return row, X_adv


def summarize(rows: list[dict]) -> list[dict]:
    """Per round: the denoiser's conditioning stage's adversarial residual (SD: the UNet's; Flux: the
    worse of ``txt_in`` and ``vector_in``), the worst over stages, and the
    largest ‖Δ‖/‖W‖ and preserve residual of any stage."""
    out: dict[int, dict] = {}
    for r in rows:
        o = out.setdefault(
            r["round"],
            {
                "round": r["round"],
                "stages": 0,
                "adv_residual_unet": None,
                "adv_residual_max": None,
                "delta_rel_max": 0.0,
                "preserve_residual_max": None,
            },
        )
        o["stages"] += 1
        a = r.get("adv_residual")
        if r.get("group") in ("context", "pooled") and a is not None:  # the denoiser's conditioning stage(s)
            u = o["adv_residual_unet"]
            o["adv_residual_unet"] = a if u is None else max(u, a)
        if a is not None:
            o["adv_residual_max"] = a if o["adv_residual_max"] is None else max(o["adv_residual_max"], a)
        o["delta_rel_max"] = max(o["delta_rel_max"], r["delta_rel"])
        p = r.get("preserve_residual")
        if p is not None:
            o["preserve_residual_max"] = p if o["preserve_residual_max"] is None else max(o["preserve_residual_max"], p)
    return [out[k] for k in sorted(out)]
