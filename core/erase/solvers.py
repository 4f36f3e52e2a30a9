"""Closed-form solvers for one linear layer ``y = W x`` (features are matrix **columns**).

docs/method.md, "UCE" and "Zero-residual solve". Everything here runs in float64.

Layers that read the same inputs (all UNet cross-attention ``to_k``/``to_v``; a text-encoder
layer's ``k_proj``/``v_proj``) share one factorisation of their features: build a
:class:`ZeroResidualBasis` or :class:`UCEBasis` once, then call ``.delta(W_o)`` per matrix.
Each ``delta`` returns ΔW together with an exact factorisation ``ΔW = up @ down`` (rank ≤ N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


def _inv_sqrt_psd(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C^{-1/2} and C^{1/2} of a symmetric positive-definite matrix."""
    evals, evecs = torch.linalg.eigh(C)
    evals = evals.clamp_min(evals.max() * 1e-12)
    return (evecs * evals.rsqrt()) @ evecs.T, (evecs * evals.sqrt()) @ evecs.T


def preserve_matrix(P: torch.Tensor | None, d_in: int, lam: float, eta_p: float) -> torch.Tensor | None:
    """``C = λ I + η_p P Pᵀ`` (None when there is nothing to preserve)."""
    if P is None or P.numel() == 0:
        return None
    P = P.to(F64)
    return lam * torch.eye(d_in, dtype=F64) + eta_p * (P @ P.T)


FALLBACK_RIDGE = 1e-2


def gram_fro_norm(S: torch.Tensor) -> float:
    """``‖XᵀX‖_F`` from the singular values ``S`` of ``X`` (``= sqrt(Σ σ⁴)``): the ridge scale of
    docs/method.md, "Conditioning: exact or ridge", without forming the N × N Gram matrix, so memory
    grows with the number of features N, never with N²."""
    S = S.to(F64)
    return float(torch.sqrt(torch.sum(S**4)))


@dataclass
class ZeroResidualBasis:
    """Min-norm (or C-weighted) solution of ``Δ X = R`` for any ``R`` (docs/method.md,
    "Zero-residual solve"), with a ridge fallback for ill-conditioned systems ("Conditioning: exact or
    ridge").

    - without preservation: ``Δ = R X⁺`` (rows of Δ in span(X));
    - with ``C = λI + η_p P Pᵀ``: ``Δ = R (C^{-1/2} X)⁺ C^{-1/2}`` = argmin tr(Δ C Δᵀ) s.t. ΔX = R.

    Solver choice (``self.solver``):
    - ``"exact"``: the (weighted) features are well-conditioned — every singular value kept by the
      numerical-rank cutoff ``rcond·σ_max`` is at least ``cond_limit·σ_max`` — so the min-norm
      pseudoinverse solution is used; the residual is zero whenever the system is consistent.
    - ``"ridge"``: otherwise (near-collinear features, e.g. padding rows of many similar prompts,
      or more features than dimensions), exactness would cost a large weight change along weak
      directions, so ``Δ = R Xᵀ(XXᵀ + μI)⁻¹`` with ``μ = ridge·‖XᵀX‖_F`` is used instead.
    ``ridge=None`` (default) picks automatically with the fallback strength ``FALLBACK_RIDGE``;
    ``ridge=0`` always uses the pseudoinverse; ``ridge>0`` always uses that ridge. The residual is
    measured and reported by the caller either way.

    Options (docs/method.md, "Split solve and column merging"; both off by default):
    - ``exact_subspace=t`` (``solver = "split"``): the constraint is exact on the principal subspace —
      the kept directions with ``σ ≥ t·σ_max`` get ``1/σ`` — and a ridge on the rest (``σ/(σ² + μ)``,
      ``μ = ridge·‖X_wᵀX_w‖_F``, ``ridge=None`` meaning ``FALLBACK_RIDGE``). Equivalently, with
      ``X_w = U S Vᵀ``: ``(ΔX − R) V_p = 0`` exactly for the principal right singular vectors ``V_p``,
      and ``Δ`` minimises ``tr(Δ C Δᵀ) + ‖(ΔX − R) V_⊥‖²/μ`` under that constraint.
    - ``merge_tol=τ``: before the solve, near-identical feature columns are merged greedily in column
      order: column ``j`` joins the group of the first earlier unassigned leader ``i`` with
      ``‖x_j − x_i‖ ≤ τ·‖x_i‖``. A group of ``m`` columns becomes one column ``√m·mean(x)`` with target
      ``√m·mean(r)`` (the √m keeps the group's weight in a ridge), i.e. the constraints are ``Δ X G = R G``
      for the N × M grouping matrix ``G``. ``τ = 0`` merges exact duplicates only.
    """

    X: torch.Tensor  # d_in × N
    C: torch.Tensor | None = None  # d_in × d_in
    rcond: float = 1e-6
    ridge: float | None = None
    cond_limit: float = 1e-2
    exact_subspace: float | None = None
    merge_tol: float | None = None

    def __post_init__(self):
        X = self.X.to(F64)
        self._group = None
        self.columns = int(X.shape[1])  # columns actually solved (after merging)
        if self.merge_tol is not None and X.shape[1] > 1:
            G = merge_columns(X, self.merge_tol)
            if G.shape[1] < X.shape[1]:
                self._group = G
                X = X @ G
                self.columns = int(G.shape[1])
        # a whitening factor L with C = L Lᵀ (Δ = R (L⁻¹X)⁺ L⁻¹ is the same for every factor of C): the
        # Cholesky factor costs d³/3 where C^{-1/2} by eigendecomposition costs about 30× more (15 s at
        # d = 4096 on 2 cores, once per stage), so the eigendecomposition is only the fallback
        self._chol = self._right = None
        if self.C is not None:
            C = self.C.to(F64)
            L, info = torch.linalg.cholesky_ex(C)
            if int(info) == 0:
                self._chol = L
                Xw = torch.linalg.solve_triangular(L, X, upper=False)
            else:
                Cis, _ = _inv_sqrt_psd(C)
                Xw = Cis @ X
                self._right = Cis
        else:
            Xw = X
        U, S, Vh = torch.linalg.svd(Xw, full_matrices=False)
        if S.numel() == 0 or S[0] <= 0:
            self.rank, self.kappa, self.solver = 0, 0.0, "exact"
            self._left = torch.zeros(self.X.shape[1], 0, dtype=F64)
            self._down = torch.zeros(0, X.shape[0], dtype=F64)
            return
        keep = S > self.rcond * S[0]
        self.kappa = float(S[keep][-1] / S[0])  # smallest kept σ relative to σ_max
        ridge = self.ridge
        Sk = S[keep]
        self.exact_rank = int(keep.sum())  # directions solved exactly (all of them for "exact")
        if self.exact_subspace is not None:
            ridge = FALLBACK_RIDGE if ridge is None else ridge
            mu = ridge * gram_fro_norm(S)
            principal = Sk >= self.exact_subspace * S[0]
            inv = torch.where(principal, 1.0 / Sk, Sk / (Sk**2 + mu))
            self.exact_rank = int(principal.sum())
            self.solver = "split"
        else:
            if ridge is None:
                ridge = 0.0 if self.kappa >= self.cond_limit else FALLBACK_RIDGE
            if ridge > 0:
                mu = ridge * gram_fro_norm(S)
                inv = Sk / (Sk**2 + mu)
                self.solver = "ridge"
                self.exact_rank = 0
            else:
                inv = 1.0 / Sk
                self.solver = "exact"
        self.rank = int(keep.sum())
        # Δ = R · G · V_r diag(inv) · U_rᵀ · (C^{-1/2})
        self._left = Vh[keep].T * inv  # M × r
        if self._group is not None:
            self._left = self._group @ self._left  # N × r
        Uk = U[:, keep]  # d_in × r
        if self._chol is not None:  # U_rᵀ L⁻¹ = (L⁻ᵀ U_r)ᵀ
            self._down = torch.linalg.solve_triangular(self._chol.T, Uk, upper=True).T
        else:
            self._down = Uk.T @ self._right if self._right is not None else Uk.T

    def delta(self, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ΔW, up, down) with ΔW = up @ down, for the residual target ``R`` (d_out × N)."""
        up = R.to(F64) @ self._left
        return up @ self._down, up, self._down


def merge_columns(X: torch.Tensor, tol: float) -> torch.Tensor:
    """The N × M grouping matrix ``G`` of :class:`ZeroResidualBasis`'s ``merge_tol`` (greedy, in column
    order; a group of ``m`` columns gets ``1/√m`` in each member's row, so ``X G`` = √m·group mean)."""
    X = X.to(F64)
    N = X.shape[1]
    norms = X.norm(dim=0)
    # direct differences (not the Gram form), so exact duplicates are at distance 0 and merge at tol = 0
    D = torch.cdist(X.T, X.T, compute_mode="donot_use_mm_for_euclid_dist")
    free = torch.ones(N, dtype=torch.bool)
    groups = []
    for i in range(N):
        if not free[i]:
            continue
        members = free & (D[i] <= tol * norms[i])
        members[i] = True
        idx = members.nonzero().flatten()
        free[idx] = False
        groups.append(idx)
    G = torch.zeros(N, len(groups), dtype=F64)
    for k, idx in enumerate(groups):
        G[idx, k] = 1.0 / len(idx) ** 0.5
    return G


@dataclass
class UCEBasis:
    """UCE's closed form (docs/method.md, "UCE"), sharing ``M⁻¹`` across every matrix that reads the
    same inputs:

        W' = (λW_o + η_e W_o Y Xᵀ + η_p W_o P Pᵀ)(λI + η_e X Xᵀ + η_p P Pᵀ)⁻¹
        ⇒ ΔW = W' − W_o = η_e · W_o (Y − X) · Xᵀ M⁻¹     with M = λI + η_e XXᵀ + η_p PPᵀ.

    ``X``: erase-concept embeddings c_i (columns), ``Y``: their guides c*_i, ``P``: preserved p_j.
    """

    X: torch.Tensor
    Y: torch.Tensor
    P: torch.Tensor | None = None
    lam: float = 0.5
    eta_e: float = 1.0
    eta_p: float = 1.0

    def __post_init__(self):
        X, Y = self.X.to(F64), self.Y.to(F64)
        d = X.shape[0]
        M = self.lam * torch.eye(d, dtype=F64) + self.eta_e * (X @ X.T)
        if self.P is not None and self.P.numel():
            P = self.P.to(F64)
            M = M + self.eta_p * (P @ P.T)
        # down = η_e Xᵀ M⁻¹  (M symmetric: solve M Z = X, down = η_e Zᵀ)
        self._down = self.eta_e * torch.linalg.solve(M, X).T  # N × d_in
        self._YmX = Y - X

    def delta(self, W_o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        up = W_o.to(F64) @ self._YmX  # d_out × N
        return up @ self._down, up, self._down
