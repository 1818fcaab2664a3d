"""worker.eta.EtaEstimator: the time left counts down steadily instead of jumping."""

from __future__ import annotations

import pytest

from worker.eta import EtaEstimator


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_uneven_phases_do_not_make_the_eta_jump():
    """A slow first phase (embedding: 40 % of the time for 10 % of the progress) then fast steps:
    the raw estimate swings by minutes, the smoothed one never rises by more than a few seconds
    between two updates and still ends at 0."""
    clock = Clock()
    eta = EtaEstimator(clock=clock)
    schedule = [(t, 0.1 * t / 40.0) for t in range(2, 41, 2)]  # slow: 40 s for 10 %
    schedule += [(40 + t, 0.1 + 0.9 * t / 60.0) for t in range(2, 61, 2)]  # fast: 60 s for 90 %
    shown, raws = [], []
    for now, progress in schedule:
        clock.now = float(now)
        shown.append(eta.update(progress))
        raws.append(eta.raw(progress, clock.now))
    steps = [b - a for a, b in zip(shown, shown[1:], strict=False)]
    raw_steps = [b - a for a, b in zip(raws, raws[1:], strict=False)]
    assert max(abs(s) for s in raw_steps) > 3 * max(abs(s) for s in steps)
    assert max(steps) <= 2.0  # never a jump up (7 s → 29 s was the bug)
    assert shown[-1] == 0.0


def test_first_estimate_is_the_raw_one_and_none_without_progress():
    clock = Clock()
    eta = EtaEstimator(clock=clock)
    assert eta.update(None) is None
    clock.now = 0.5
    assert eta.update(0.1) is None  # under a second: nothing to extrapolate yet
    clock.now = 10.0
    assert eta.update(0.25) == pytest.approx(30.0)
    clock.now = 12.0
    raw = 12.0 * 0.75 / 0.25  # 36 s
    assert eta.update(0.25) == pytest.approx(
        28.0 + 0.2 * (raw - 28.0)
    )  # 30 s counted down 2 s, then smoothed


def test_bad_smoothing_is_refused():
    with pytest.raises(ValueError, match="smoothing"):
        EtaEstimator(smoothing=0.0)
