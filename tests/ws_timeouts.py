"""Time limits of the tests that run a long subprocess (ComfyUI harness, Gradio tab, dependency
floor): the margin scales with the machine, and running out of it is reported as a skip naming the
reason — a slow or loaded machine — never as a failure of the code (issue 37).

``WEIGHTSMITH_TEST_TIMEOUT_FACTOR`` (default 1) multiplies every limit; the limit is further
multiplied by the machine's load per core at the start (1-minute load average / cores, at least 1).
"""

from __future__ import annotations

import os
import subprocess

import pytest


def factor() -> float:
    try:
        user = float(os.environ.get("WEIGHTSMITH_TEST_TIMEOUT_FACTOR", "1") or 1)
    except ValueError:
        user = 1.0
    try:
        load = os.getloadavg()[0] / max(1, os.cpu_count() or 1)
    except (OSError, AttributeError):
        load = 1.0
    return max(user, 0.01) * max(1.0, load)


def scaled(seconds: float) -> float:
    """``seconds`` scaled for this machine (see the module docstring)."""
    return seconds * factor()


def slow_machine(what: str, seconds: float) -> None:
    """Skip the running test: ``what`` did not finish within ``seconds`` on this machine."""
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        load = "unknown"
    pytest.skip(
        f"{what} did not finish within {seconds:.0f} s on this machine ({os.cpu_count()} cores, "
        f"load {load}): a slow or busy machine, not a failure of the code. Rerun when it is idle or set "
        "WEIGHTSMITH_TEST_TIMEOUT_FACTOR (e.g. 3) for a longer limit."
    )


def run(cmd, timeout: float, what: str, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, timeout=scaled(timeout), **kw)``; a timeout skips the test (:func:`slow_machine`)."""
    limit = scaled(timeout)
    try:
        return subprocess.run(cmd, timeout=limit, **kw)
    except subprocess.TimeoutExpired:
        slow_machine(what, limit)
