"""How the lab prints and renders its figures, defined once: a judge-read value with its 95%
interval, the model card's percentages, the column sets of the erasure and merging tables, and
those tables as text and as HTML (the demo's report, ``bench quality``, the sweeps, the model card).
"""

from __future__ import annotations

import html

ERASE_COLS = [
    ("target_simple", "target, simple ↓"),
    ("target_context", "target, context ↓"),
    ("target_two", "target, two objects ↓"),
    ("anchor", "anchor ↑"),
    ("preserved", "other shapes correct ↑"),
    ("drift", "drift ↓"),
]
MERGE_COLS = [
    ("subject", "subject trait ↑"),
    ("style", "style trait ↑"),
    ("subject_leak", "style leak on subject ↓"),
    ("style_leak", "subject leak on style ↓"),
    ("both", "both traits, both triggers ↑"),
    ("drift", "drift, no trigger ↓"),
]


def fmt_interval(m: dict) -> str:
    """A judge-read rate or mean with its 95% interval: ``0.42 [0.30, 0.55]``."""
    from ..world.evaluate import value

    lo, hi = m["ci"]
    return f"{value(m):.2f} [{lo:.2f}, {hi:.2f}]"


def fmt_percent(m: dict) -> str:
    """A rate in percent with its interval and sample size (the model card's figures)."""
    lo, hi = m["ci"]
    return f"{m['rate']:.1%} [{lo:.1%}, {hi:.1%}] (n = {m['n']})"


def fmt_judge(m: dict) -> str:
    """A judge figure of the erase sweep: a rate as :func:`fmt_interval`, a drift mean to 4 places."""
    return fmt_interval(m) if "rate" in m else f"{m['mean']:.4f}"


def print_metrics(title: str, metrics: dict, cols, out=print) -> None:
    """One table per section: a row per model, a column per ``(key, title)`` of ``cols`` (the key heads it)."""
    out(title)
    out(f"  {'model':<14}" + "".join(f"{k[:19]:>20}" for k, _ in cols))
    for name, m in metrics.items():
        out(f"  {name:<14}" + "".join(f"{fmt_interval(m[k]):>20}" for k, _ in cols))


def html_table(metrics: dict, cols) -> str:
    """The same table as HTML, headed by the columns' titles."""
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols)
    body = ""
    for name, m in metrics.items():
        body += (
            f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{fmt_interval(m[k])}</td>" for k, _ in cols) + "</tr>"
        )
    return f"<table><tr><th>model</th>{head}</tr>{body}</table>"
