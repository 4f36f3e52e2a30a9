"""The split solve (``exact_subspace``) and column merging (``merge_tol``) of docs/method.md ("Split solve
and column merging") against independent float64 computations, their validation, and the
``bench erase --sweep --quick`` smoke run."""

import math

import pytest
import torch

from weightsmith.core.cli import main
from weightsmith.core.erase import EraseOptions, erase
from weightsmith.core.erase.solvers import FALLBACK_RIDGE, ZeroResidualBasis, merge_columns, preserve_matrix
from weightsmith.core.errors import WeightsmithError

F64 = torch.float64


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def _spread(d, n, seed, lo=-5):
    """d × n features with singular values spread log-uniformly over 10^lo … 1."""
    q1, _ = torch.linalg.qr(_rand(d, n, seed=seed))
    q2, _ = torch.linalg.qr(_rand(n, n, seed=seed + 1))
    s = torch.logspace(0, lo, n, dtype=F64)
    return (q1 * s) @ q2.T


def _kkt_split(W_out, X, C, R, t, ridge):
    """Independent solve of  min tr(Δ C Δᵀ) + ‖(ΔX − R) V_⊥‖²/μ  s.t. (ΔX − R) V_p = 0,
    with V from eigh(Xᵀ C⁻¹ X) (not an SVD of C^{-1/2} X), μ = ridge·‖Xᵀ C⁻¹ X‖_F, by the KKT system."""
    d = X.shape[0]
    Ci = torch.linalg.inv(C) if C is not None else torch.eye(d, dtype=F64)
    Cm = C if C is not None else torch.eye(d, dtype=F64)
    M = X.T @ Ci @ X
    ev, V = torch.linalg.eigh(M)  # ascending; σ = sqrt(ev)
    sig = ev.clamp_min(0).sqrt()
    p = sig >= t * sig.max()
    Vp, Vr = V[:, p], V[:, ~p]
    mu = ridge * float(M.norm())
    A, B = X @ Vp, X @ Vr  # constraint and soft directions in input space
    k = A.shape[1]
    K = torch.zeros(d + k, d + k, dtype=F64)
    K[:d, :d] = 2 * Cm + (2 / mu) * B @ B.T
    K[:d, d:] = A
    K[d:, :d] = A.T
    rhs = torch.cat([(2 / mu) * B @ (R @ Vr).T, (R @ Vp).T], 0)  # one column per output row
    sol = torch.linalg.solve(K, rhs)
    return sol[:d].T, Vp, Vr


@pytest.mark.parametrize("with_c", [False, True])
def test_split_solve_is_exact_on_the_principal_subspace_and_matches_kkt(with_c):
    d, n = 14, 9
    X = _spread(d, n, seed=1)
    W, Y = _rand(11, d, seed=3), _rand(d, n, seed=4)
    R = W @ (Y - X)
    C = preserve_matrix(_rand(d, 5, seed=5), d, lam=0.5, eta_p=1.0) if with_c else None
    t, ridge = 1e-2, 1e-3
    b = ZeroResidualBasis(X, C, rcond=1e-12, ridge=ridge, exact_subspace=t)
    delta, up, down = b.delta(R)
    ref, Vp, Vr = _kkt_split(W, X, C, R, t, ridge)
    assert b.solver == "split" and b.exact_rank == Vp.shape[1] and 0 < b.exact_rank < n
    assert torch.allclose(delta, ref, atol=1e-8 * float(ref.norm()), rtol=0), float((delta - ref).norm())
    assert torch.allclose(up @ down, delta, atol=1e-12)
    res = delta @ X - R
    assert float((res @ Vp).norm()) < 1e-9 * float(R.norm())  # exact on the principal subspace
    assert float((res @ Vr).norm()) > 1e-3 * float((R @ Vr).norm())  # soft (not exact) on the rest
    exact, _, _ = ZeroResidualBasis(X, C, rcond=1e-12, ridge=0).delta(R)
    assert float(delta.norm()) < 0.1 * float(exact.norm())  # the weak directions are not paid for


def test_split_with_every_direction_principal_is_the_exact_solve():
    X, W, Y = _spread(12, 6, seed=7, lo=-2), _rand(5, 12, seed=8), _rand(12, 6, seed=9)
    R = W @ (Y - X)
    split, _, _ = ZeroResidualBasis(X, rcond=1e-12, exact_subspace=1e-3).delta(R)
    assert torch.allclose(split, R @ torch.linalg.pinv(X), atol=1e-9)


def test_split_default_ridge_is_the_fallback_strength():
    X, W, Y = _spread(12, 8, seed=10), _rand(5, 12, seed=11), _rand(12, 8, seed=12)
    R = W @ (Y - X)
    a = ZeroResidualBasis(X, rcond=1e-12, exact_subspace=1e-2).delta(R)[0]
    b = ZeroResidualBasis(X, rcond=1e-12, ridge=FALLBACK_RIDGE, exact_subspace=1e-2).delta(R)[0]
    assert torch.equal(a, b)


def _naive_groups(X, tol):
    """Greedy leader grouping written as plain Python loops over columns."""
    N = X.shape[1]
    group = [-1] * N
    leaders = []
    for i in range(N):
        if group[i] >= 0:
            continue
        group[i] = len(leaders)
        for j in range(i + 1, N):
            if group[j] < 0 and float((X[:, j] - X[:, i]).norm()) <= tol * float(X[:, i].norm()):
                group[j] = len(leaders)
        leaders.append(i)
    return group


def test_merge_columns_matches_a_naive_grouping_and_solves_the_merged_system():
    base = _rand(10, 4, seed=13)
    noise = 1e-3 * _rand(10, 7, seed=14)
    X = torch.cat([base, base[:, [0, 2, 0]] + noise[:, :3], _rand(10, 1, seed=20), base[:, [3]] + noise[:, 3:4]], 1)
    tol = 0.01
    G = merge_columns(X, tol)
    group = _naive_groups(X, tol)
    assert G.shape == (X.shape[1], max(group) + 1) == (9, 5)
    for j, g in enumerate(group):
        assert G[j].nonzero().flatten().tolist() == [g]
    # the solve on merged columns equals the pseudoinverse of explicitly averaged columns and targets
    W, Y = _rand(6, 10, seed=15), _rand(10, X.shape[1], seed=16)
    R = W @ (Y - X)
    Xm = torch.stack([X[:, [j for j in range(9) if group[j] == g]].mean(1) for g in range(5)], 1)
    Rm = torch.stack([R[:, [j for j in range(9) if group[j] == g]].mean(1) for g in range(5)], 1)
    delta, up, down = ZeroResidualBasis(X, rcond=1e-12, ridge=0, merge_tol=tol).delta(R)
    assert torch.allclose(delta, Rm @ torch.linalg.pinv(Xm), atol=1e-9)
    assert torch.allclose(delta @ Xm, Rm, atol=1e-9)
    assert torch.allclose(up @ down, delta, atol=1e-12)


@pytest.mark.parametrize("solver", [dict(ridge=0), dict(ridge=1e-2), dict(exact_subspace=1e-2), dict()])
def test_merging_exact_duplicates_changes_nothing(solver):
    # exact duplicates with different targets: the merged LS/ridge/split objective is the original one
    # (the √m weighting keeps XXᵀ and so the ridge scale), so Δ must be identical
    X = _spread(10, 5, seed=17, lo=-4)
    X = torch.cat([X, X[:, [1, 1, 3]]], 1)
    W, Y = _rand(4, 10, seed=18), _rand(10, 8, seed=19)
    R = W @ (Y - X)
    a = ZeroResidualBasis(X, rcond=1e-12, **solver)
    m = ZeroResidualBasis(X, rcond=1e-12, merge_tol=0.0, **solver)
    assert m.columns == 5 and a.columns == 8 and a.solver == m.solver
    assert torch.allclose(a.delta(R)[0], m.delta(R)[0], atol=1e-9 * float(a.delta(R)[0].norm()))


def test_pipeline_options_reach_the_solver_and_report(tiny_models):
    model = tiny_models["sd1"]
    base = erase(model, ["van gogh"], ["art"], method="erasepro", options=EraseOptions(ridge=0))
    merged = erase(model, ["van gogh"], ["art"], method="erasepro", options=EraseOptions(ridge=0, merge_tol=0.0))
    for n, d in base.deltas.items():  # exact duplicates only: identical edit
        assert torch.allclose(d, merged.deltas[n], atol=1e-4 * float(d.norm()) + 1e-7), n
    assert any(s["solved_columns"] < s["features"] for s in merged.report["stages"])
    split = erase(model, ["van gogh"], ["art"], method="zero-residual", options=EraseOptions(exact_subspace=1e-2))
    st = split.report["stages"]
    assert {s["solver"] for s in st} == {"split"} and all(0 < s["exact_rank"] <= s["rank"] for s in st)
    assert split.report["options"]["exact_subspace"] == 1e-2


@pytest.mark.parametrize(
    "fields, msg",
    [
        ({"exact_subspace": 0.0}, "must be above rcond"),
        ({"exact_subspace": 1.5}, "at most 1"),
        ({"exact_subspace": 1e-7}, "must be above rcond"),
        ({"exact_subspace": math.nan}, "finite number"),
        ({"exact_subspace": 1e-2, "ridge": 0}, "ridge (--ridge) is 0"),
        ({"merge_tol": -0.1}, "merge_tol (--merge-tol) must be >= 0"),
        ({"merge_tol": 1.0}, "below 1"),
        ({"merge_tol": "0.1"}, "finite number"),
    ],
)
def test_bad_options_are_refused_clearly(fields, msg):
    with pytest.raises(WeightsmithError) as e:
        EraseOptions(**fields).validate()
    assert msg in str(e.value)


def test_uce_refuses_the_zero_residual_options(tiny_models):
    with pytest.raises(WeightsmithError, match="UCE has its own closed form"):
        erase(tiny_models["sd1"], ["van gogh"], ["art"], method="uce", options=EraseOptions(merge_tol=0.1))


def _erase_van_gogh(ckpt, tok, out, *args):
    """`weightsmith erase` of 'van gogh' toward 'art' into OUT, quiet, with ARGS: its exit status."""
    argv = ["erase", "--model", str(ckpt), "--tokenizer", str(tok), "--target", "van gogh", "--anchor", "art"]
    return main([*argv, "--out", str(out), *map(str, args), "--quiet"])


def test_cli_refuses_bad_option_before_loading(tiny_checkpoints, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    ckpt = tiny_checkpoints["sd1"]
    rc = _erase_van_gogh(ckpt, tokenizer_dir, out, "--exact-subspace", 2)
    assert rc == 2 and "at most 1" in capsys.readouterr().err and not out.exists()
    rc = _erase_van_gogh(ckpt, tokenizer_dir, out, "--method", "uce", "--merge-tol", 0.1)
    assert rc == 2 and "UCE has its own closed form" in capsys.readouterr().err and not out.exists()


def test_cli_split_and_merge_write_an_edit(tiny_checkpoints, tokenizer_dir, tmp_path):
    import json

    out, rep = tmp_path / "o.safetensors", tmp_path / "r.json"
    opts = ["--format", "lora", "--exact-subspace", "1e-2", "--merge-tol", "0.05", "--report", rep]
    rc = _erase_van_gogh(tiny_checkpoints["sd1"], tokenizer_dir, out, *opts)
    assert rc == 0 and out.exists()
    r = json.loads(rep.read_text())
    assert r["options"]["exact_subspace"] == 1e-2 and r["options"]["merge_tol"] == 0.05
    assert {s["solver"] for s in r["stages"]} == {"split"}


def test_sweep_quick_smoke(capsys):
    assert main(["bench", "erase", "--sweep", "--quick"]) == 0
    out = capsys.readouterr().out
    for label in (
        "auto (default)",
        "ridge 0 (exact)",
        "split 1e-2",
        "ρ edit",
        "ρ held",
        "‖Δ‖/‖W‖ per stage",
        "Spearman r",
        "does ‖Δ‖/‖W‖ fall with depth",
    ):
        assert label in out, label
    row = next(line for line in out.splitlines() if line.startswith("ridge 0 (exact)"))
    assert row.split()[3] == "exact"


def test_sweep_quick_json_figures_are_consistent(capsys):
    import json

    from weightsmith.core.lab.measures import spearman as _spearman

    assert main(["bench", "erase", "--sweep", "--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    by = {r["setting"]: r for r in rows}
    # nothing dropped rows here, so the solver's own residual is the all-rows residual
    for r in rows:
        assert abs(r["rho_edit"] - r["rho_solved"]) < 1e-4 * max(1.0, r["rho_edit"])
    # the exact solve leaves no more residual on the edit prompts than the ridge it replaces, at a larger Δ
    assert by["ridge 0 (exact)"]["rho_edit"] <= by["auto (default)"]["rho_edit"] + 1e-9
    assert by["ridge 0 (exact)"]["delta_rel"]["unet"] >= by["auto (default)"]["delta_rel"]["unet"]
    assert _spearman([3, 2, 1]) == -1 and _spearman([1, 2, 3]) == 1
