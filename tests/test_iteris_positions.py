"""IterIS statistics from a subset of positions (``max_rows``; docs/merge.md, "Speed"): the subset
Gram matrices stand for the full ones, paired passes read the same positions, and the merge with a
cap large enough equals the merge without one."""

import torch

from weightsmith.core.merge.stats import GramStats, module_rows


class _Model:
    def __init__(self, mods):
        self.mods = mods

    def module(self, n):
        return self.mods[n]


def _setup(max_rows, seed=0):
    torch.manual_seed(0)
    mods = {"unet.conv": torch.nn.Conv2d(3, 5, 3, padding=1).double(), "unet.lin": torch.nn.Linear(6, 4).double()}
    st = GramStats(_Model(mods), sorted(mods), max_rows=max_rows, seed=seed)
    return mods, st


def _inputs(call):
    g = torch.Generator().manual_seed(100 + call)
    return (
        torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 10, 6, generator=g, dtype=torch.float64),
    )


def _gram_pass(max_rows, calls=3, seed=0):
    mods, st = _setup(max_rows, seed)
    st.mode = "gram"
    with torch.no_grad():
        for c in range(calls):
            xc, xl = _inputs(c)
            mods["unet.conv"](xc)
            mods["unet.lin"](xl)
    return {n: st.acc[n]["G"].clone() for n in mods}, dict(st.rows)


def _full(calls=3):
    mods, _ = _setup(0)
    out = {n: 0 for n in mods}
    for c in range(calls):
        xc, xl = _inputs(c)
        for n, x in (("unet.conv", xc), ("unet.lin", xl)):
            r = module_rows(mods[n], x)
            out[n] = out[n] + r.t() @ r
    return out


def test_a_cap_at_or_above_the_positions_changes_nothing():
    full = _full()
    capped, _ = _gram_pass(36)  # 36 = 6 × 6 pixels of the conv; the linear layer has 10 tokens
    for n in full:
        assert torch.equal(capped[n], _gram_pass(0)[0][n])
        assert torch.allclose(capped[n], full[n], rtol=1e-12, atol=1e-12)


def test_each_item_gives_the_cap_and_the_subset_gram_stands_for_all_positions():
    full = _full()
    _, rows = _gram_pass(4)
    assert rows == {"unet.conv": 3 * 2 * 4, "unet.lin": 3 * 2 * 4}
    # unbiased: the mean over seeds approaches the full Gram, one seed alone does not equal it
    mean = {n: 0 for n in full}
    seeds = 400
    for s in range(seeds):
        G, _ = _gram_pass(4, seed=s)
        for n in full:
            mean[n] = mean[n] + G[n] / seeds
    for n in full:
        one = _gram_pass(4, seed=0)[0][n]
        err_one = float((one - full[n]).norm() / full[n].norm())
        err_mean = float((mean[n] - full[n]).norm() / full[n].norm())
        assert err_one > 0.05, (n, err_one)
        assert err_mean < 0.25 * err_one, (n, err_mean, err_one)


def test_same_seed_same_bytes_other_seed_other_positions():
    a, _ = _gram_pass(4, seed=3)
    b, _ = _gram_pass(4, seed=3)
    c, _ = _gram_pass(4, seed=4)
    for n in a:
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])


def test_paired_passes_and_later_iterations_read_the_positions_iteration_0_read():
    """x/pair mode with X̃ = X gives H equal to iteration 0's G: the same positions in every pass."""
    G, _ = _gram_pass(4, seed=7)
    mods, st = _setup(4, seed=7)
    down = torch.randn(2, 27, dtype=torch.float64)
    st.projections = {"unet.conv": [("unet.conv", down)]}
    with torch.no_grad():
        for c in range(3):
            xc, xl = _inputs(c)
            for mode in ("x", "pair"):
                st.mode = mode
                mods["unet.conv"](xc)
                mods["unet.lin"](xl)
    for n in mods:
        assert torch.allclose(st.acc[n]["H"], G[n], rtol=1e-12, atol=1e-12), n
    assert torch.allclose(st.acc["unet.conv"][("D", "unet.conv")], down @ G["unet.conv"], rtol=1e-10, atol=1e-10)
    st.check_paired()
