"""tests/ws_timeouts.py: a long subprocess that runs out of its (machine-scaled) limit is a skip
naming a slow machine, never a failure (issue 37)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import ws_timeouts as T  # noqa: E402


def test_a_timeout_is_reported_as_a_skip_naming_the_slow_machine(monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_TEST_TIMEOUT_FACTOR", "0.01")
    with pytest.raises(pytest.skip.Exception, match="slow or busy machine, not a failure of the code"):
        T.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=5, what="a sleeper")


def test_the_limit_scales_with_the_factor_and_the_load(monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("WEIGHTSMITH_TEST_TIMEOUT_FACTOR", "3")
    assert T.scaled(100) == pytest.approx(300)
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * (os.cpu_count() or 1), 0.0, 0.0))
    assert T.scaled(100) == pytest.approx(1200)
    r = T.run([sys.executable, "-c", "print('ok')"], timeout=60, what="x", capture_output=True, text=True)
    assert r.stdout.strip() == "ok"
