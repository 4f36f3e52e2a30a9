"""Forge's code for the tests that run it in-process (Forge is AGPL-3.0: never copied here, never fetched
by the suite). ``WEIGHTSMITH_FORGE_DIR`` names a Forge source folder, or a build whose ``webui/`` is one
(as tests/test_a1111_real.py takes it); without it those tests are skipped and say why."""

import os
from pathlib import Path

import pytest


def forge_source(marker: str, doc: str) -> Path:
    """The folder holding Forge's ``marker`` file (a path inside the source tree); ``doc``: where the docs
    say what the skipped test verifies."""
    d = os.environ.get("WEIGHTSMITH_FORGE_DIR")
    for root in (Path(d), Path(d) / "webui") if d else ():
        if (root / marker).is_file():
            return root
    pytest.skip(f"WEIGHTSMITH_FORGE_DIR does not name a Forge source folder ({doc})")
