"""Progress and cancellation, the same way for every front end.

Solvers take ``progress(done, total, label)`` and ``cancel() -> bool`` callables. The CLI passes a
tqdm bar, ComfyUI its ProgressBar and interrupt check, A1111 its ``shared.state``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import CancelledError

ProgressFn = Callable[[int, int, str], None]
CancelFn = Callable[[], bool]


def format_duration(seconds: float) -> str:
    """``45 s``, ``3 min``, ``1 h 05 min``: how long estimates are written everywhere."""
    s = max(0, int(round(seconds)))
    if s < 90:
        return f"{s} s"
    m = int(round(s / 60))
    return f"{m} min" if m < 60 else f"{m // 60} h {m % 60:02d} min"


class Steps:
    """Counts steps of a long job, reports them and raises CancelledError when asked to stop.

    ``costs`` (optional, one relative cost per step) lets it estimate the time left from the time
    the finished steps took; the estimate is added to each label (``… · ≈3 min left``) and is
    available as :meth:`eta_s`. ``cost_blocks`` gives the same as ``(costs of some steps, repeats)``
    blocks, so a job of many identical rounds needs no cost per step in memory."""

    def __init__(
        self,
        total: int,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        costs: list[float] | None = None,
        *,
        cost_blocks: list | None = None,
    ):
        self.total = max(1, int(total))
        self.done = 0
        self._progress = progress
        self._cancel = cancel
        if cost_blocks is None:
            if costs is not None and len(costs) != self.total:
                raise ValueError("Steps: costs needs one positive cost per step")
            cost_blocks = [(costs, 1)] if costs is not None else [([1.0], self.total)]
        # (costs of a block's steps, how many times the block repeats, its cost): a job that repeats
        # the same round of steps (IterIS' iterations) holds one round, whatever the number of rounds
        self._blocks = [([float(c) for c in b], int(r)) for b, r in cost_blocks if int(r) > 0 and len(b)]
        self._blocks = [(b, r, sum(b)) for b, r in self._blocks]
        if sum(len(b) * r for b, r, _ in self._blocks) != self.total or any(
            c <= 0 for b, _, _ in self._blocks for c in b
        ):
            raise ValueError("Steps: costs needs one positive cost per step")
        self._total_cost = self._cost_to(self.total)
        self._t0 = time.monotonic()

    def _cost_to(self, n: int) -> float:
        """The summed cost of the first ``n`` steps."""
        total = 0.0
        for b, r, cost in self._blocks:
            size = len(b) * r
            if n >= size:
                total, n = total + cost * r, n - size
                continue
            full, rest = divmod(n, len(b))
            return total + cost * full + sum(b[:rest])
        return total

    def check(self) -> None:
        if self._cancel is not None and self._cancel():
            raise CancelledError("stopped by the user before finishing; nothing was written.")

    def start(self, label: str = "") -> None:
        """Report the job before its first step (bar at 0) and restart the clock."""
        self._t0 = time.monotonic()
        if self._progress is not None:
            self._progress(0, self.total, label)

    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    def eta_s(self) -> float | None:
        """Seconds left, from the time per unit of cost so far (None before the first step)."""
        done_cost = self._cost_to(self.done)
        if self.done == 0 or done_cost <= 0:
            return None
        return self.elapsed_s() / done_cost * (self._total_cost - done_cost)

    def step(self, label: str = "", n: int = 1) -> None:
        self.check()
        self.done = min(self.total, self.done + n)
        if self._progress is not None:
            eta = self.eta_s()
            if eta is not None and self.done < self.total:
                label = f"{label} · ≈{format_duration(eta)} left" if label else f"≈{format_duration(eta)} left"
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
