"""The interval arithmetic behind every quality figure, checked against independent computations."""

import math

import pytest

from weightsmith.core.world.metrics import mean_ci, rate_ci, wilson


@pytest.mark.parametrize("k,n", [(0, 48), (1, 48), (24, 48), (47, 48), (48, 48), (96, 140), (3, 7)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """The Wilson bounds are the two p with |p̂ − p| = z·sqrt(p(1−p)/n): solve that quadratic here."""
    z = 1.959964
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    disc = math.sqrt(max(0.0, b * b - 4 * a * c))
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(max(0.0, (-b - disc) / (2 * a)), abs=1e-12)
    assert hi == pytest.approx(min(1.0, (-b + disc) / (2 * a)), abs=1e-12)
    assert lo <= ph <= hi


def test_rate_and_mean_intervals():
    r = rate_ci([True] * 12 + [False] * 36)
    assert (r["k"], r["n"]) == (12, 48) and r["rate"] == 0.25
    assert r["ci"] == list(wilson(12, 48))
    m = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(sum((x - 2.5) ** 2 for x in (1, 2, 3, 4)) / 3)
    assert m["mean"] == 2.5 and m["ci"][1] - 2.5 == pytest.approx(1.959964 * sd / 2)
    assert math.isnan(wilson(0, 0)[0])


def test_context_breakdown_counts_each_attribute_of_the_bar():
    """Four hand-made judge reads of one prompted object, each wrong in a different way, counted by hand."""
    from weightsmith.core.world.metrics import context_breakdown, scene_hits
    from weightsmith.core.world.render import Obj, Scene

    sc = Scene((Obj("circle", "red", "large", "left"),), "black")

    def read(shape="circle", colour="red", size="large", position="left", bg="black"):
        return {"objects": [{"shape": shape, "colour": colour, "size": size, "position": position}], "background": bg}

    reads = [read(), read(position="right"), read(colour="blue"), read(size="small", bg="gray")]
    scenes = [sc] * 4
    hits = scene_hits(reads, scenes, "context")
    assert hits == [True, False, False, False]
    b = context_breakdown(reads, scenes, hits)
    assert b == {
        "n": 4,
        "shape_colour": 3 / 4,
        "position_given_found": 2 / 3,
        "size_given_found": 2 / 3,
        "background": 3 / 4,
        "all": 1 / 4,
    }
