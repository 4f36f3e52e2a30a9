"""A Unix socket bound at a path of any length (tests that put special files in pytest's deep temp folders).

A socket's address is limited to 107 bytes, and pytest's temp paths under a long checkout or
``--basetemp`` exceed it ("AF_UNIX path too long"); binding the name relative to its folder has no
such limit and makes the very same filesystem node.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def unix_socket_at(path) -> socket.socket:
    """An AF_UNIX stream socket bound at ``path`` (not listening); close it when done."""
    path = Path(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        s.bind(path.name)
    except OSError:
        s.close()
        raise
    finally:
        os.chdir(cwd)
    return s
