"""Forge's ``modules`` package, stand-in: the Forge-specific modules live here; the ones Forge
shares with A1111 v1.10 (paths, shared, shared_state, call_queue) come from ../../fake_webui."""

import os

__path__.append(
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "fake_webui", "modules")
)
