"""Data-free merge baselines (docs/method.md, "Merge baselines"). All work on the LoRAs' deltas per module.

- ``linear``: task arithmetic ``Σ w_i ΔW_i`` (what stacking LoRA loaders does); dense result.
- ``concat``: the same sum kept exact as factors of rank ``Σ r_i`` (kohya ``--concat``).
- ``svd``: kohya ``svd_merge_lora.py``: ``Σ w_i ΔW_i`` truncated by SVD to ``rank``, ``U·S`` and
  ``Vh`` entries clamped to ``±q`` with ``q`` the 0.99-quantile of their concatenated entries. The SVD
  is taken from the LoRAs' factors (QR of both, SVD of the Σrᵢ × Σrᵢ core: the same singular triplets
  as the dense sum's, in seconds where a full-size Flux layer's dense SVD takes minutes on a CPU), and
  each singular pair's sign is fixed (largest entry of its left vector positive), which kohya leaves
  to the SVD routine.
- ``ties``: per module, keep each delta's top ``density`` fraction by magnitude, elect the sign of
  the weighted sum, average (weighted) the entries that agree with it, times ``ties_lambda``.
- ``dare``: drop each entry with probability ``p`` (seeded), rescale survivors by ``1/(1−p)``, sum
  weighted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..edit import Edit, FactorDeltas, LazyFactors
from ..factor import numerical_rank, product_norm, svd_of_product


def _modules(loras):
    return sorted(set().union(*[set(l.modules) for l in loras]))


def _shape(loras, n):
    return next(l.modules[n].shape for l in loras if n in l.modules)


def _edit(model, deltas, method):
    """A dense edit (ties, dare: they work on the entries of each ΔW)."""
    dense = {k: v.float() for k, v in deltas.items()}
    return Edit(model.family, dict(model.unet_config), dense, {}, {"method": method})


def _factor_edit(model, loras, factors, method) -> Edit:
    """An edit held as exact factors, ΔW formed one module at a time when read (bounded memory)."""
    shapes = {n: _shape(loras, n) for n in _modules(loras)}
    return Edit(model.family, dict(model.unet_config), FactorDeltas(factors, shapes), factors, {"method": method})


def _concat_factors(loras, weights, n):
    """``[w₁s₁up₁ | …]`` and ``[down₁ ; …]`` of module ``n`` (2-D, float64): ``Σ wᵢΔWᵢ`` exactly."""
    ups, downs = [], []
    for l, w in zip(loras, weights):
        if n in l.modules:
            m = l.modules[n]
            ups.append(w * m.scale * m.up.double().reshape(m.up.shape[0], -1))
            downs.append(m.down.double().reshape(m.down.shape[0], -1))
    return torch.cat(ups, 1), torch.cat(downs, 0)


def _numerical(up, down):
    """``up @ down`` as factors of its numerical rank (the rank a dense sum's SVD shows)."""
    U, S, Vh = svd_of_product(up, down)
    r = numerical_rank(S)
    return (U[:, :r] * S[:r]).float().contiguous(), Vh[:r].float().contiguous()


def linear(model, loras, weights) -> Edit:
    """Σ wᵢ ΔWᵢ, held as exact factors at the sum's numerical rank (the concatenated factors compressed
    through their small core: identical LoRAs or zero weights do not widen the file), ΔW formed one module
    at a time when read."""
    factors = {n: _numerical(*_concat_factors(loras, weights, n)) for n in _modules(loras)}
    return _factor_edit(model, loras, factors, "linear")


def concat(model, loras, weights) -> Edit:
    factors = {n: tuple(f.float().contiguous() for f in _concat_factors(loras, weights, n)) for n in _modules(loras)}
    return _factor_edit(model, loras, factors, "concat")


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(np.quantile(x.detach().double().cpu().numpy(), q))


def _canonical_signs(U: torch.Tensor, Vh: torch.Tensor):
    """Each singular pair's sign fixed so the largest-magnitude entry of its left vector is positive (SVD
    leaves the sign to the LAPACK build; kohya's clamp below is not sign-symmetric, so this makes the
    result the same on every device and by either route)."""
    idx = U.abs().argmax(0)
    s = torch.sign(U[idx, torch.arange(U.shape[1])])
    s[s == 0] = 1
    return U * s, Vh * s[:, None]


def _svd_of_sum(U0: torch.Tensor, V0: torch.Tensor):
    """The thin SVD of ``U0 @ V0`` from the factors (:func:`~weightsmith.core.factor.svd_of_product`),
    each pair's sign fixed."""
    U, S, Vh = svd_of_product(U0, V0)
    U, Vh = _canonical_signs(U, Vh)
    return U, S, Vh


def svd_merge(model, loras, weights, rank: int | None = None, clamp_quantile: float = 0.99) -> Edit:
    rank = int(rank or max(m.rank for l in loras for m in l.modules.values()))
    errors: dict = {}

    def one(n):  # one module's SVD, when its factors are first read
        U0, V0 = _concat_factors(loras, weights, n)
        U, S, Vh = _svd_of_sum(U0, V0)
        r = min(rank, S.numel())
        U = U[:, :r] * S[:r]
        Vh = Vh[:r]
        hi = _quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp_quantile)
        U, Vh = U.clamp(-hi, hi), Vh.clamp(-hi, hi)
        full = product_norm(U0, V0)  # the error from the factors: ‖[U, −U0]·[Vh; V0]‖ / ‖U0·V0‖
        errors[n] = product_norm(torch.cat([U, -U0], 1), torch.cat([Vh, V0], 0)) / full if full > 0 else 0.0
        return U.float().contiguous(), Vh.float().contiguous()

    e = _factor_edit(model, loras, LazyFactors(_modules(loras), one), "svd")
    e.report.update({"rank": rank, "clamp_quantile": clamp_quantile, "svd_errors": errors})
    return e


def ties(model, loras, weights, density: float = 0.2, lam: float = 1.0) -> Edit:
    deltas = {}
    for n in _modules(loras):
        shape = _shape(loras, n)
        trimmed, ws = [], []
        for l, w in zip(loras, weights):
            d = l.modules[n].delta(torch.float64) if n in l.modules else torch.zeros(shape, dtype=torch.float64)
            k = max(1, int(math.ceil(density * d.numel())))
            flat = d.abs().flatten()
            thr = torch.kthvalue(flat, flat.numel() - k + 1).values if k < flat.numel() else flat.min()
            trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
            ws.append(float(w))
        T = torch.stack(trimmed)
        W = torch.tensor(ws, dtype=torch.float64).reshape(-1, *([1] * len(shape)))
        sign = torch.sign((W * T).sum(0))
        agree = (torch.sign(T) == sign) & (T != 0)
        num = (W * T * agree).sum(0)
        den = (W * agree).sum(0)
        deltas[n] = lam * torch.where(den != 0, num / den.where(den != 0, torch.ones_like(den)), torch.zeros_like(num))
    e = _edit(model, deltas, "ties")
    e.report.update({"density": density, "lambda": lam})
    return e


def dare(model, loras, weights, p: float = 0.5, seed: int = 0) -> Edit:
    if not 0.0 <= p < 1.0:
        from ..errors import WeightsmithError

        raise WeightsmithError(f"DARE drop probability must be in [0, 1), got {p}.")
    gen = torch.Generator().manual_seed(int(seed))
    deltas = {}
    for n in _modules(loras):
        out = None
        for l, w in zip(loras, weights):
            if n not in l.modules:
                continue
            d = l.modules[n].delta(torch.float64)
            keep = torch.rand(d.shape, generator=gen, dtype=torch.float64) >= p
            d = w * d * keep / (1.0 - p)
            out = d if out is None else out + d
        deltas[n] = out
    e = _edit(model, deltas, "dare")
    e.report.update({"p": p, "seed": seed})
    return e
