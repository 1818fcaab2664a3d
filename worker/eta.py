"""A run's estimated time left that counts down steadily instead of jumping.

The raw estimate ``elapsed · (1 − p) / (p − p₀)`` swings whenever the phases' real cost differs
from their share of the progress (embedding a dataset is slow for its share, an evaluation fast):
the admin UI once showed 7 s → 29 s while progress rose. :class:`EtaEstimator` keeps its last
estimate, counts it down with the wall clock, and moves it a fraction of the way towards each new
raw estimate (exponential smoothing), so the shown figure changes gradually; the first estimate
is the raw one.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class EtaEstimator:
    """``update(progress) → seconds left`` (None until there is progress to extrapolate)."""

    def __init__(
        self,
        start_progress: float = 0.0,
        *,
        smoothing: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError("smoothing must be in (0, 1]")
        self.start_progress = start_progress
        self.smoothing = smoothing
        self.clock = clock
        self.started = clock()
        self._last: tuple[float, float] | None = None  # (time, estimate)

    def raw(self, progress: float, now: float) -> float | None:
        done = progress - self.start_progress
        elapsed = now - self.started
        if done <= 1e-6 or elapsed < 1.0:
            return None
        return max(0.0, elapsed * (1.0 - progress) / done)

    def update(self, progress: float | None) -> float | None:
        if progress is None:
            return None
        now = self.clock()
        raw = self.raw(progress, now)
        if raw is None:
            return None if self._last is None else max(0.0, self._last[1] - (now - self._last[0]))
        if progress >= 1.0:
            estimate = 0.0
        elif self._last is None:
            estimate = raw
        else:
            counted_down = max(0.0, self._last[1] - (now - self._last[0]))
            estimate = counted_down + self.smoothing * (raw - counted_down)
        self._last = (now, estimate)
        return estimate
