"""Data-free baselines against independent implementations (docs/method.md, "Merge baselines")."""

import math

import numpy as np
import pytest
import torch

from weightsmith.core.lab.random_loras import random_lora
from weightsmith.core.lora_read import lora_from_state_dict
from weightsmith.core.merge import MergeOptions, merge
from weightsmith.core.naming import kohya_prefix


@pytest.fixture(scope="module")
def case(tiny_models):
    model = tiny_models["sd1"]
    raw = [random_lora(model, groups=("attn", "te"), rank=r, seed=s) for s, r in ((1, 4), (2, 2))]
    loras = [lora_from_state_dict(t, model, metadata=m, name=f"l{i}") for i, (t, m) in enumerate(raw)]
    dense = []
    for (t, _), l in zip(raw, loras):  # ΔW straight from the kohya tensors, keyed like the reader
        d = {}
        for n in l.modules:
            p = kohya_prefix(n, model.family, model.layout)
            r = t[p + ".lora_down.weight"].shape[0]
            d[n] = float(t[p + ".alpha"]) / r * t[p + ".lora_up.weight"].double() @ t[p + ".lora_down.weight"].double()
        dense.append(d)
    return model, loras, dense


def _close(a, b, tol=1e-5):
    assert float((a.double() - b.double()).norm()) <= tol * max(float(b.double().norm()), 1e-12)


def test_linear_and_concat(case):
    model, loras, dense = case
    w = [0.7, 1.3]
    lin = merge(model, loras, "linear", weights=w)
    cat = merge(model, loras, "concat", weights=w)
    for n in lin.deltas:
        exp = sum(wi * d[n] for wi, d in zip(w, dense) if n in d)
        _close(lin.deltas[n], exp)
        _close(cat.deltas[n], exp)
        up, down = cat.factors[n]
        assert up.shape[1] == 4 + 2
        _close(up.double() @ down.double(), exp)


def test_svd_merge_matches_kohya_style(case):
    model, loras, dense = case
    e = merge(model, loras, "svd", options=MergeOptions(svd_rank=3))
    for n in e.deltas:
        mat = dense[0][n] + dense[1][n]
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)  # the dense sum, each pair signed as ours
        sign = torch.sign(U[U.abs().argmax(0), torch.arange(U.shape[1])])
        U, Vh = U * sign, Vh * sign[:, None]
        U = U[:, :3] @ torch.diag(S[:3])
        Vh = Vh[:3, :]
        hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), 0.99)
        exp = U.clamp(-hi, hi) @ Vh.clamp(-hi, hi)
        _close(e.deltas[n], exp, 1e-4)
        assert e.factors[n][0].shape[1] == 3


def test_ties(case):
    model, loras, dense = case
    w = [1.0, 0.5]
    e = merge(model, loras, "ties", weights=w, options=MergeOptions(ties_density=0.3))
    for n in e.deltas:
        ts = []
        for d in dense:
            a = d[n].numpy().copy()
            k = math.ceil(0.3 * a.size)
            thr = np.sort(np.abs(a).ravel())[::-1][k - 1]
            a[np.abs(a) < thr] = 0.0
            ts.append(a)
        elect = np.sign(w[0] * ts[0] + w[1] * ts[1])
        num = np.zeros_like(ts[0])
        cnt = np.zeros_like(ts[0])
        for wi, t in zip(w, ts):
            ok = (np.sign(t) == elect) & (t != 0)
            num += np.where(ok, wi * t, 0.0)
            cnt += np.where(ok, wi, 0.0)
        exp = np.divide(num, cnt, out=np.zeros_like(num), where=cnt != 0)
        _close(e.deltas[n], torch.from_numpy(exp))
        frac = float((e.deltas[n] != 0).double().mean())
        assert 0.25 < frac < 0.6


def test_dare_is_seeded_and_rescales(case):
    model, loras, dense = case
    e1 = merge(model, loras[:1], "dare", options=MergeOptions(dare_p=0.5, seed=3))
    e2 = merge(model, loras[:1], "dare", options=MergeOptions(dare_p=0.5, seed=3))
    e3 = merge(model, loras[:1], "dare", options=MergeOptions(dare_p=0.5, seed=4))
    kept = total = 0
    for n, d in e1.deltas.items():
        assert torch.equal(d, e2.deltas[n])
        ref = dense[0][n]
        nz = d != 0
        _close(d[nz], 2.0 * ref[nz])  # survivors are rescaled by 1/(1-p)
        kept += int(nz.sum())
        total += d.numel()
    assert abs(kept / total - 0.5) < 0.02
    assert any(not torch.equal(d, e3.deltas[n]) for n, d in e1.deltas.items())


def test_svd_from_the_factors_equals_the_dense_svd():
    """The SVD of Σ wᵢ upᵢ·downᵢ taken through QR of the factors = the dense matrix's own SVD (each pair's
    sign fixed the same way), and the dense route where Σ rᵢ reaches a side."""
    from weightsmith.core.merge.baselines import _svd_of_sum

    g = torch.Generator().manual_seed(0)
    for m, n, r, dup in ((300, 80, 12, 0), (40, 90, 6, 0), (200, 60, 10, 5)):  # R < both sides: the QR route
        U0 = torch.randn(m, r, generator=g, dtype=torch.float64)
        V0 = torch.randn(r, n, generator=g, dtype=torch.float64)
        if dup:  # the same LoRA twice: rank r - dup, the rest of the spectrum zero
            U0[:, dup:], V0[dup:] = U0[:, :dup], V0[:dup]
        U, S, Vh = _svd_of_sum(U0, V0)
        Ud, Sd, Vhd = torch.linalg.svd(U0 @ V0, full_matrices=False)
        sign = torch.sign(Ud[Ud.abs().argmax(0), torch.arange(Ud.shape[1])])
        Ud, Vhd = Ud * sign, Vhd * sign[:, None]
        assert torch.allclose(S[:r], Sd[:r], rtol=1e-10, atol=1e-9)
        k = r - dup if dup else r  # singular vectors of zero singular values are arbitrary
        assert torch.allclose(U[:, :k], Ud[:, :k], atol=1e-8) and torch.allclose(Vh[:k], Vhd[:k], atol=1e-8)


def test_linear_of_a_lora_with_itself_keeps_its_rank(case):
    """``linear`` is held at the sum's numerical rank: the same LoRA twice is 2ΔW at the LoRA's rank (the
    concatenated factors would be twice as wide)."""
    model, loras, dense = case
    lin = merge(model, [loras[0], loras[0]], "linear")
    cat = merge(model, [loras[0], loras[0]], "concat")
    for n in lin.deltas:
        _close(lin.deltas[n], 2 * dense[0][n])
        assert lin.factors[n][0].shape[1] == 4 and cat.factors[n][0].shape[1] == 8


def test_norms_and_finiteness_from_factors():
    from weightsmith.core.factor import product_is_finite, product_norm

    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(50, 4, generator=g), torch.randn(4, 30, generator=g)
    assert math.isclose(product_norm(up, down), float((up.double() @ down.double()).norm()), rel_tol=1e-9)
    assert product_is_finite(up, down)
    assert not product_is_finite(up * 1e20, down * 1e20)  # the product overflows float32
    bad = up.clone()
    bad[3, 1] = float("nan")
    assert not product_is_finite(bad, down)
