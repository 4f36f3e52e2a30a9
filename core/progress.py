"""Progress and cancellation, the same way for every front end.

Solvers take ``progress(done, total, label)`` and ``cancel() -> bool`` callables. The CLI passes a
tqdm bar, ComfyUI its ProgressBar and interrupt check, A1111 its ``shared.state``.
"""
from __future__ import annotations

from typing import Callable

from .errors import CancelledError

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]


class Steps:
    """Counts steps of a long job, reports them and raises CancelledError when asked to stop."""

    def __init__(self, total: int, progress: ProgressFn | None = None, cancel: CancelFn | None = None):
        self.total = max(1, int(total))
        self.done = 0
        self._progress = progress
        self._cancel = cancel

    def check(self) -> None:
        if self._cancel is not None and self._cancel():
            raise CancelledError("stopped by the user before finishing; nothing was written.")

    def step(self, label: str = "", n: int = 1) -> None:
        self.check()
        self.done = min(self.total, self.done + n)
        if self._progress is not None:
            self._progress(self.done, self.total, label)


def tqdm_progress(desc: str):
    """A ``progress`` callable drawing a tqdm bar on stderr; call ``.close()`` when done."""
    from tqdm import tqdm

    bar = tqdm(total=1, desc=desc, unit="step", leave=False, dynamic_ncols=True)

    def progress(done: int, total: int, label: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(label[:40], refresh=False)
        bar.refresh()

    progress.close = bar.close  # type: ignore[attr-defined]
    return progress
