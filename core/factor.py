"""The one SVD factoriser: ΔW -> (up, down) with ``up @ down`` ≈ ΔW (docs/method.md, "LoRA files").

The writer uses it to turn a delta without exact factors into a LoRA (rank ≤ the numerical rank,
error reported); the reader uses it, with a stricter cutoff, to hold a full-delta (``.diff``,
LoHa, LoKr) module as exact factors.
"""

from __future__ import annotations

import torch

WRITE_RTOL = 1e-6  # singular values below this fraction of the largest are numerical zero when writing
READ_RTOL = 1e-9  # ... when reading a full delta (it must come back as it was in the file)


def svd_factor(delta: torch.Tensor, rank: int | None, rtol: float = WRITE_RTOL):
    """ΔW (2-D or conv) -> (up, down, relative error). ``rank=None``: numerical rank (exact)."""
    shape = delta.shape
    d2 = delta.reshape(shape[0], -1).double()
    U, S, Vh = torch.linalg.svd(d2, full_matrices=False)
    num_rank = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 1
    r = max(1, min(num_rank if rank is None else rank, num_rank, S.numel()))
    up = U[:, :r] * S[:r]
    down = Vh[:r]
    err = float(S[r:].norm() / S.norm()) if S.norm() > 0 else 0.0
    if len(shape) == 4:
        up = up.reshape(shape[0], r, 1, 1)
        down = down.reshape(r, *shape[1:])
    return up.float(), down.float(), err


def exact_factors(delta2d: torch.Tensor, rtol: float = READ_RTOL):
    """Exact factors of a full 2-D delta at its numerical rank: ``(up, down)`` with up@down == Δ."""
    up, down, _ = svd_factor(delta2d, None, rtol)
    return up, down


def svd_of_product(up: torch.Tensor, down: torch.Tensor):
    """The thin SVD ``(U, S, Vh)`` of ``up @ down`` (2-D; up: out × R, down: R × in), float64, without
    forming the product where R is below both sides: QR of both factors, then the SVD of the R × R core
    (the same singular triplets as the dense product's)."""
    up, down = up.double(), down.double()
    if up.shape[1] >= min(up.shape[0], down.shape[1]):
        return torch.linalg.svd(up @ down, full_matrices=False)
    Qu, Ru = torch.linalg.qr(up)
    Qd, Rd = torch.linalg.qr(down.t())
    U, S, Vh = torch.linalg.svd(Ru @ Rd.t())
    return Qu @ U, S, Vh @ Qd.t()


def numerical_rank(S: torch.Tensor, rtol: float = WRITE_RTOL) -> int:
    """How many singular values are above ``rtol`` of the largest (at least 1)."""
    return max(1, int((S > rtol * S[0]).sum())) if S.numel() and S[0] > 0 else 1


def product_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """‖up @ down‖_F without forming the product: √Σ (upᵀup) ∘ (down downᵀ) (float64)."""
    up, down = up.double().reshape(up.shape[0], -1), down.double().reshape(down.shape[0], -1)
    return float(((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt())


def product_is_finite(up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether ``up @ down`` is finite in float32, from the factors: both finite, and every entry's
    Cauchy–Schwarz bound (largest row norm of ``up`` × largest column norm of ``down``) below float32's
    largest value."""
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        return False
    u, d = up.double().reshape(up.shape[0], -1), down.double().reshape(down.shape[0], -1)
    bound = float(u.norm(dim=1).max()) * float(d.norm(dim=0).max()) if u.numel() and d.numel() else 0.0
    return bound < float(torch.finfo(torch.float32).max)
