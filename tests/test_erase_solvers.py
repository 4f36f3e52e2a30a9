"""Closed forms of docs/method.md ("UCE", "Zero-residual solve") against independent computations."""

import torch

from weightsmith.core.erase.solvers import UCEBasis, ZeroResidualBasis, preserve_matrix

F64 = torch.float64


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def test_min_norm_solution_is_exact_and_orthogonal_inputs_unchanged():
    W, X, Y = _rand(20, 16, seed=1), _rand(16, 5, seed=2), _rand(16, 5, seed=3)
    R = W @ (Y - X)
    delta, up, down = ZeroResidualBasis(X, rcond=1e-12).delta(R)
    assert torch.allclose((W + delta) @ X, W @ Y, atol=1e-10)
    assert torch.allclose(up @ down, delta, atol=1e-12) and up.shape[1] == 5
    assert torch.allclose(delta, R @ torch.linalg.pinv(X), atol=1e-10)
    q, _ = torch.linalg.qr(torch.cat([X, _rand(16, 11, seed=4)], 1))
    z = q[:, 5:]  # orthogonal to every target feature
    assert torch.allclose(delta @ z, torch.zeros(20, 11, dtype=F64), atol=1e-10)


def test_preservation_weighted_form_matches_the_textbook_formula():
    W, X, Y, P = _rand(12, 10, seed=5), _rand(10, 3, seed=6), _rand(10, 3, seed=7), _rand(10, 6, seed=8)
    C = preserve_matrix(P, 10, lam=0.5, eta_p=1.0)
    R = W @ (Y - X)
    delta, _, _ = ZeroResidualBasis(X, C, rcond=1e-12).delta(R)
    Ci = torch.linalg.inv(C)
    expected = R @ torch.linalg.inv(X.T @ Ci @ X) @ X.T @ Ci
    assert torch.allclose(delta, expected, atol=1e-9)
    assert torch.allclose(delta @ X, R, atol=1e-9)


def test_cholesky_whitening_equals_the_symmetric_square_root_and_its_fallback(monkeypatch):
    """The weighted solve whitens with C's Cholesky factor; C^{-1/2} by eigendecomposition (the fallback
    when the factorisation fails) gives the same Δ, exact and ridge alike (Δ = R (WX)⁺ W for any
    WᵀW = C⁻¹)."""
    W, X, Y, P = _rand(9, 14, seed=21), _rand(14, 4, seed=22), _rand(14, 4, seed=23), _rand(14, 5, seed=24)
    X = torch.cat([X, X[:, :1] + 1e-5 * _rand(14, 1, seed=25)], 1)  # near-collinear: the auto ridge applies
    C = preserve_matrix(P, 14, lam=0.5, eta_p=1.0)
    R = W @ (torch.cat([Y, Y[:, :1]], 1) - X)
    e, V = torch.linalg.eigh(C)
    Cis = (V * e.rsqrt()) @ V.T  # independent: the symmetric C^{-1/2}
    for ridge in (0.0, None):
        got = ZeroResidualBasis(X, C, rcond=1e-12, ridge=ridge)
        assert got._chol is not None
        U, S, Vh = torch.linalg.svd(Cis @ X, full_matrices=False)
        if got.solver == "ridge":
            mu = 1e-2 * float(torch.sqrt((S**4).sum()))
            inv = S / (S**2 + mu)
        else:
            inv = 1.0 / S
        expected = R @ (Vh.T * inv) @ U.T @ Cis
        assert torch.allclose(got.delta(R)[0], expected, atol=1e-9)
        monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A: (A, torch.tensor(1)))  # "not positive definite"
        fb = ZeroResidualBasis(X, C, rcond=1e-12, ridge=ridge)
        monkeypatch.undo()
        assert fb._chol is None and fb.solver == got.solver
        assert torch.allclose(fb.delta(R)[0], expected, atol=1e-9)
    assert got.solver == "ridge"  # the loop covered both solvers


def test_uce_matches_public_formula_and_its_residual_closed_form():
    W, X, Y, P = _rand(8, 10, seed=9), _rand(10, 3, seed=10), _rand(10, 3, seed=11), _rand(10, 4, seed=12)
    lam, ee, ep = 0.5, 1.0, 1.0
    delta, up, down = UCEBasis(X, Y, P, lam, ee, ep).delta(W)
    I = torch.eye(10, dtype=F64)
    W_new = (lam * W + ee * W @ Y @ X.T + ep * W @ P @ P.T) @ torch.linalg.inv(lam * I + ee * X @ X.T + ep * P @ P.T)
    assert torch.allclose(W + delta, W_new, atol=1e-10)
    assert torch.allclose(up @ down, delta, atol=1e-12)
    C = lam * I + ep * P @ P.T
    res = W_new @ X - W @ Y
    expected = W @ (X - Y) @ torch.linalg.inv(torch.eye(3, dtype=F64) + ee * X.T @ torch.linalg.inv(C) @ X)
    assert torch.allclose(res, expected, atol=1e-9)
    assert res.norm() > 1e-3


def test_cutoff_drops_weak_directions_and_reports_rank():
    X = _rand(8, 3, seed=13)
    X = torch.cat([X, X[:, :1] * (1 + 1e-9)], 1)  # a collinear column
    b = ZeroResidualBasis(X, rcond=1e-6)
    assert b.rank == 3
    W = _rand(4, 8, seed=14)
    delta, _, _ = b.delta(W @ (_rand(8, 4, seed=15) - X))
    assert torch.isfinite(delta).all() and delta.norm() < 1e3
