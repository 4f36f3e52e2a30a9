"""The ``weightsmith`` command line.

Sub-commands live beside the code they drive; each module exposes ``register(subparsers)`` that
adds its parser and sets ``func`` (called with the parsed args, returns an exit code). Errors a
user can fix (:class:`WeightsmithError`) print as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import CancelledError, WeightsmithError

# (module, attribute) of every sub-command provider, in --help order
COMMANDS = [
    ("weightsmith.core.erase.cli", "register"),
    ("weightsmith.core.attack.cli", "register"),
    ("weightsmith.core.merge.cli", "register"),
    ("weightsmith.core.merge.reweight", "register"),
    ("weightsmith.core.lab.demo", "register"),
    ("weightsmith.core.lab.bench", "register"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="weightsmith", description="Closed-form weight editing for Stable Diffusion: erase concepts, merge LoRAs."
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"weightsmith {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod, attr in COMMANDS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("weightsmith"):
                continue  # a feature that is not part of this build
            raise
        getattr(m, attr)(sub)
    return p


def _interrupted(n_before: int, how: str = "interrupted") -> str:
    from .safe_io import WRITTEN

    done = WRITTEN[n_before:]
    if done:
        return f"weightsmith: {how}; {', '.join(str(p) for p in done)} had been written completely, nothing else."
    return f"weightsmith: {how}; nothing was written."


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C (every temp file removed, docs/reliability.md)
    and the command exits with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _install_signal_handlers() -> dict:
    """SIGTERM and SIGHUP raise :class:`Terminated` (only from the main thread; a handler a host or
    the user installed is left alone). Returns the previous handlers, to restore."""
    import signal
    import threading

    old = {}
    if threading.current_thread() is not threading.main_thread():
        return old
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        prev = signal.getsignal(sig)
        if prev in (signal.SIG_DFL, None):
            signal.signal(sig, _raise_terminated)
            old[sig] = prev
    return old


def resolve_aliases(argv: list[str]) -> list[str]:
    """The command line with old spellings of a sub-command replaced (``bench erase --sweep``)."""
    try:
        from .lab.bench import resolve_aliases as bench_aliases
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("weightsmith"):
            return argv  # the lab is not part of this build
        raise
    return bench_aliases(argv)


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from .safe_io import WRITTEN

    n_before = len(WRITTEN)
    old_handlers = _install_signal_handlers()
    try:
        parser = build_parser()
        args = parser.parse_args(resolve_aliases(sys.argv[1:] if argv is None else list(argv)))
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except CancelledError as e:
        print(f"weightsmith: cancelled: {e}", file=sys.stderr)
        return 130
    except Terminated as e:
        import signal

        print(_interrupted(n_before, f"terminated by {signal.Signals(e.signum).name}"), file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(_interrupted(n_before), file=sys.stderr)
        return 130
    except WeightsmithError as e:
        print(f"weightsmith: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file-system error not caught closer to its cause: one line, no traceback
        from .safe_io import os_error_message

        print(f"weightsmith: error: {os_error_message(e, what='access')}", file=sys.stderr)
        return 2
    finally:
        import signal

        for sig, prev in old_handlers.items():
            signal.signal(sig, prev)


if __name__ == "__main__":
    sys.exit(main())
