"""The admin UI's per-session selection record, which keeps a late periodic refresh from
overwriting the detail of a run selected meanwhile."""

from __future__ import annotations

from frontend.runs_tab import SelectionTracker


def test_a_refresh_for_the_previous_selection_is_stale():
    tracker = SelectionTracker()
    assert not tracker.is_stale("s1", "3")  # a session that never selected: nothing to protect
    tracker.remember("s1", 3)
    assert not tracker.is_stale("s1", "3") and not tracker.is_stale("s1", 3)
    tracker.remember("s1", "5")  # the user picks run 5 while a refresh for run 3 is in flight
    assert tracker.is_stale("s1", "3")
    assert not tracker.is_stale("s1", "5")
    assert not tracker.is_stale("s2", "3")  # sessions are independent
    tracker.remember("s1", None)  # cleared selection: any run's detail is stale
    assert tracker.is_stale("s1", "5") and not tracker.is_stale("s1", "")
    tracker.remember(None, "7")  # no session (no request): ignored
    assert not tracker.is_stale(None, "1")


def test_only_the_latest_sessions_are_kept():
    tracker = SelectionTracker(max_sessions=2)
    for session, run in (("a", 1), ("b", 2), ("c", 3)):
        tracker.remember(session, run)
    assert not tracker.is_stale("a", 99)  # forgotten: treated as never selected
    assert tracker.is_stale("b", 99) and tracker.is_stale("c", 99)
    tracker.remember("b", 4)  # refreshed sessions stay
    tracker.remember("d", 5)
    assert tracker.is_stale("b", 99) and not tracker.is_stale("c", 99)
