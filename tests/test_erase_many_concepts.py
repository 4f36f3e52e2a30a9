"""Many concepts at once (issue 37, docs/reliability.md "Many concepts"): the erase solvers' memory
grows with the number of features N, never with N² — no N × N matrix (the Gram XᵀX the ridge scale
once formed) is allocated anywhere in an erase."""

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from weightsmith.core.erase import EraseOptions, erase
from weightsmith.core.erase.solvers import ZeroResidualBasis, gram_fro_norm
from weightsmith.core.tokenizer import DEFAULT_WORDS


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor any torch operation returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_ridge_scale_from_singular_values_equals_the_gram_norm():
    g = torch.Generator().manual_seed(0)
    for d, n in ((8, 30), (30, 8), (16, 16)):
        X = torch.randn(d, n, generator=g, dtype=torch.float64)
        S = torch.linalg.svdvals(X)
        assert gram_fro_norm(S) == pytest.approx(float((X.T @ X).norm()), rel=1e-12)
    # the solver's ridge path uses it: Δ X matches the ridge formula R Xᵀ(XXᵀ + μI)⁻¹ X with μ = ridge‖XᵀX‖_F
    X = torch.randn(6, 40, generator=g, dtype=torch.float64)
    R = torch.randn(5, 40, generator=g, dtype=torch.float64)
    b = ZeroResidualBasis(X, ridge=1e-2)
    mu = 1e-2 * float((X.T @ X).norm())
    want = R @ X.T @ torch.linalg.inv(X @ X.T + mu * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(b.delta(R)[0], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["erasepro", "uce"])
def test_erasing_200_concepts_never_allocates_an_n_by_n_matrix(method, tiny_models):
    words = [w for w in DEFAULT_WORDS if len(w) > 2]
    targets = [f"{a} {b}" for a, b in itertools.islice(itertools.permutations(words, 2), 200)]
    opts = EraseOptions(expand_prompts=False, ridge=1e-3 if method == "erasepro" else None, max_pad=0)
    rec = _Shapes()
    with rec:
        edit = erase(tiny_models["sd1"], targets, ["art"], method=method, options=opts)
    n = max(r["features"] for r in edit.report["stages"])
    assert n >= 200  # at least one feature per target
    big = [(f, s) for f, s in rec.shapes if len(s) >= 2 and sorted(s)[-2] >= n]
    assert not big, big[:5]  # nothing with two dimensions as large as N
    assert all(torch.isfinite(d).all() for d in edit.deltas.values())
